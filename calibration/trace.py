"""Per-block Hessian traces of the calibration loss: Hutchinson's estimator (HAWQ-V2 §3.1, Alg. 1)
and the empirical-Fisher alternative.

Hutchinson: for Rademacher ``v`` (±1 entries), ``E[vᵀ H v] = Tr(H)``. One probe drawn over *all*
parameters at once gives every block's trace together, because for block ``k`` the estimate is
``v_kᵀ (H v)_k = v_kᵀ H_kk v_k + Σ_{l≠k} v_kᵀ H_kl v_l`` and the cross terms vanish in expectation.
``H v`` comes from double backward (Pearlmutter): ``∂/∂θ (∇L · v)``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
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


def _summarise(samples: torch.Tensor, probes: int) -> TraceEstimate:
    # samples: (probes, blocks)
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
        est = _summarise(torch.stack(rows), k + 1)
        bar.set_postfix(rel_se=f"{est.rel_se():.3f}")
        if k + 1 >= min_probes and est.rel_se() <= tol:
            break
    return est


@contextlib.contextmanager
def grad_only(model: nn.Module, params: list[nn.Parameter], attn: str | None):
    """Gradients for ``params`` only; eager attention (SDPA/flash kernels have no double backward)."""
    old_flags = {p: p.requires_grad for p in model.parameters()}
    old_attn = getattr(model.config, "_attn_implementation", None)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if attn and old_attn != attn and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        for p, flag in old_flags.items():
            p.requires_grad_(flag)
        if attn and old_attn and old_attn != attn and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(old_attn)
        model.train(was_training)


def window_loss(model: nn.Module, windows: torch.Tensor, device) -> torch.Tensor:
    ids = windows.to(device)
    return model(input_ids=ids, labels=ids, use_cache=False).loss  # mean next-token NLL


def model_traces(model: nn.Module, param_names: list[str], windows: torch.Tensor, device: torch.device, *,
                 method: str = "hutchinson", tol: float = 0.05, min_probes: int = 4, max_probes: int = 32,
                 seed: int = 0, progress: bool = True, max_batch_tokens: int = 1024) -> TraceEstimate:
    """Trace of the Hessian of the mean calibration NLL on ``windows`` (n, seq) w.r.t. each named
    parameter. ``method="fisher"``: the empirical Fisher ``E‖∇ℓ_window‖²`` instead (squared
    gradients of each window's loss; one backward per window, no double backward).

    The whole model sits on ``device`` for this pass (backpropagation needs every layer). Hutchinson
    keeps the double-backward graph of at most ``max_batch_tokens`` tokens: beyond that, each probe
    rebuilds it batch by batch (more compute, bounded memory)."""
    params = [model.get_parameter(n) for n in param_names]
    model.to(device)
    try:
        if method == "fisher":
            with grad_only(model, params, None):
                rows = []
                for w in tqdm(windows, desc="fisher", disable=not progress, unit="window"):
                    grads = torch.autograd.grad(window_loss(model, w[None], device), params)
                    rows.append(torch.stack([g.to(torch.float32).pow(2).sum().cpu() for g in grads]))
            return _summarise(torch.stack(rows), len(rows))
        if method != "hutchinson":
            raise ValueError(f"unknown trace method {method!r}: use hutchinson or fisher.")
        per = max(1, max_batch_tokens // max(1, windows.shape[1]))
        batches = [windows[b : b + per] for b in range(0, len(windows), per)]
        with grad_only(model, params, "eager"):
            if len(batches) == 1:  # keep the double-backward graph across probes
                grads = torch.autograd.grad(window_loss(model, windows, device), params, create_graph=True)

                def hvp(v):
                    return torch.autograd.grad(grads, params, grad_outputs=[t.to(g.dtype) for t, g in zip(v, grads)],
                                               retain_graph=True)
            else:  # bounded memory: rebuild the graph one batch at a time, H v = Σ_b n_b/n · H_b v

                def hvp(v):
                    total = None
                    for w in batches:
                        g = torch.autograd.grad(window_loss(model, w, device), params, create_graph=True)
                        hv = torch.autograd.grad(g, params, grad_outputs=[t.to(x.dtype) for t, x in zip(v, g)])
                        hv = [h * (len(w) / len(windows)) for h in hv]
                        total = hv if total is None else [a + b for a, b in zip(total, hv)]
                    return total

            gen = torch.Generator().manual_seed(seed)
            return hutchinson(hvp, [p.shape for p in params], tol=tol, min_probes=min_probes, max_probes=max_probes,
                              generator=gen, device=device, progress=progress)
    finally:
        model.to("cpu")
