"""Per-block Hessian traces of the calibration loss: Hutchinson's estimator (HAWQ-V2 §3.1, Alg. 1)
and the empirical-Fisher alternative.

Hutchinson: for Rademacher ``v`` (±1 entries), ``E[vᵀ H v] = Tr(H)``. One probe drawn over *all*
parameters at once gives every block's trace together, because for block ``k`` the estimate is
``v_kᵀ (H v)_k = v_kᵀ H_kk v_k + Σ_{l≠k} v_kᵀ H_kl v_l`` and the cross terms vanish in expectation.
For a model, ``H v`` comes layer by layer (``calibration/curvature.py``); :func:`hutchinson` is the
estimator on any ``hvp``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

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


def hutchinson(hvp: Callable[[list[torch.Tensor]], list[torch.Tensor]], shapes: Sequence[torch.Size], *,
               tol: float = 0.05, min_probes: int = 4, max_probes: int = 64, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu", progress: bool = False) -> TraceEstimate:
    """Trace of each diagonal block of ``H`` given ``hvp(v) = H v`` (block-wise lists of tensors).

    Stops once every block's standard error is below ``tol`` × the mean |trace| of the blocks (after
    ``min_probes``) or after ``max_probes``."""
    rows = []
    bar = tqdm(range(max_probes), desc="hutchinson", disable=not progress, unit="probe")
    for k in bar:
        v = [torch.randint(0, 2, tuple(s), generator=generator).to(device, torch.float32) * 2 - 1 for s in shapes]
        hv = hvp(v)
        rows.append(torch.stack([(a * b.to(torch.float32)).sum().cpu() for a, b in zip(v, hv)]))
        est = summarise(torch.stack(rows), k + 1)
        bar.set_postfix(rel_se=f"{est.rel_se():.3f}")
        if k + 1 >= min_probes and est.rel_se() <= tol:
            break
    return est


def settled(rows: list[list[float]], tol: float, min_probes: int) -> int | None:
    """The first probe count (≥ ``min_probes``) at which :func:`hutchinson`'s stopping rule holds
    for ``rows`` (probes, blocks), or None: what probing one by one would have kept."""
    for k in range(max(min_probes, 1), len(rows) + 1):
        if summarise(torch.tensor(rows[:k], dtype=torch.float64), k).rel_se() <= tol:
            return k
    return None
