"""Per-block Hessian traces of the calibration loss: Hutchinson's estimator (HAWQ-V2 §3.1, Alg. 1)
and the empirical-Fisher alternative.

Hutchinson: for Rademacher ``v`` (±1 entries), ``E[vᵀ H v] = Tr(H)``. One probe drawn over *all*
parameters at once gives every block's trace together, because for block ``k`` the estimate is
``v_kᵀ (H v)_k = v_kᵀ H_kk v_k + Σ_{l≠k} v_kᵀ H_kl v_l`` and the cross terms vanish in expectation.
For a model, ``H v`` comes layer by layer (``calibration/curvature.py``); :func:`hutchinson` is the
estimator and its stopping rule, on any source of ``vᵀHv`` samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm


@dataclass
class TraceEstimate:
    mean: list[float]  # per block
    se: list[float]  # standard error of each mean
    probes: int

    def rel_se(self) -> float:
        """Largest standard error relative to the mean |trace| over blocks. (Relative to each block's
        own trace, a block whose trace is near zero would never settle.)"""
        if not self.mean:
            return 0.0
        scale = sum(abs(m) for m in self.mean) / len(self.mean)
        return max(self.se) / scale if scale > 0 else math.inf


def summarise(samples: torch.Tensor, probes: int) -> TraceEstimate:
    """Mean and standard error per block of ``samples`` (probes, blocks)."""
    mean = samples.mean(0)
    se = samples.std(0, unbiased=True) / math.sqrt(probes) if probes > 1 else torch.full_like(mean, math.inf)
    return TraceEstimate(mean.tolist(), se.tolist(), probes)


def hutchinson(sample: Callable[[list[int]], list[list[float]]], *, tol: float = 0.05, min_probes: int = 4,
               max_probes: int = 64, per_call: int = 1, progress: bool = False) -> TraceEstimate:
    """Trace of each diagonal block of ``H`` from ``sample(probes)``, which gives ``v_kᵀ (H v)_k`` per
    block for each probe index in ``probes`` (``per_call`` at a time, in order).

    Stops after the first probe at which every block's standard error is below ``tol`` × the mean
    |trace| of the blocks (after ``min_probes``), or after ``max_probes``: the same probes are kept
    whether they come one or several per call."""
    rows: list[list[float]] = []
    bar = tqdm(total=max_probes, desc="hutchinson", disable=not progress, unit="probe")
    while len(rows) < max_probes:
        done = len(rows)
        rows += sample(list(range(done, min(max_probes, done + per_call))))
        bar.update(len(rows) - done)
        stop = next((k for k in range(max(min_probes, done + 1), len(rows) + 1)
                     if summarise(torch.tensor(rows[:k], dtype=torch.float64), k).rel_se() <= tol), None)
        if stop is not None:
            rows = rows[:stop]
            break
    est = summarise(torch.tensor(rows, dtype=torch.float64), len(rows))
    bar.set_postfix(rel_se=f"{est.rel_se():.3f}")
    bar.close()
    return est
