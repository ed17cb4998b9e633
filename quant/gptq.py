"""GPTQ (Frantar et al., 2023, arXiv:2210.17323) as one function on tensors.

Given a weight ``W`` (out, in) and the layer-wise proxy Hessian ``H = 2 X Xᵀ`` (in, in) of its
inputs, quantize the columns one at a time and push each column's rounding error onto the columns
not yet quantized, weighted by the inverse Hessian (the OBS update, paper eq. 3). The Cholesky form
of ``H⁻¹`` (paper §4, step 3) gives the updates for all remaining columns from one row of an upper
triangular factor; updates are applied lazily, ``block_size`` columns at a time (step 2).
"""
from __future__ import annotations

import logging

import torch

from .config import ModuleSpec
from .quantizer import ClipSearch, QuantizedWeight, max_code, rtn_quantize, search_qparams

log = logging.getLogger("hmq")

DAMP_RETRIES = 4  # each retry multiplies the damping by 10


class CholeskyError(RuntimeError):
    pass


def inverse_hessian_factor(H: torch.Tensor, damp_percent: float, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H' + λI)⁻¹`` (in, in), where ``H'`` is ``H`` with its rows and
    columns in ``perm`` order and every zero diagonal entry set to 1, and λ = damp_percent · mean(diag H').

    ``H`` is left as it is. One working copy is made, and each stage is dropped as soon as the next
    exists: at Llama-3-70B's ``down_proj`` (28,672 inputs) every copy is 3.3 GB in fp32, so the
    factor costs three of them at its peak, not six."""
    perm = torch.arange(H.shape[0], device=H.device) if perm is None else perm
    work = H.to(torch.float32)[perm[:, None], perm]  # one gather: a new tensor, in perm order
    dead = work.diagonal() == 0
    work.diagonal()[dead] = 1.0
    work.diagonal().add_(damp_percent * work.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(work)
    del work
    if info.item() != 0:
        raise CholeskyError("H + λI is not positive definite")
    Hinv = torch.cholesky_inverse(L)
    del L
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    del Hinv
    if info.item() != 0 or not torch.isfinite(U).all():
        raise CholeskyError("(H + λI)⁻¹ is not positive definite")
    return U


def _damped_factor(H: torch.Tensor, damp_percent: float, perm: torch.Tensor, name: str) -> torch.Tensor | None:
    damp = damp_percent
    for attempt in range(DAMP_RETRIES + 1):
        try:
            return inverse_hessian_factor(H, damp, perm)
        except CholeskyError:
            if attempt == DAMP_RETRIES:
                break
            log.warning("%s: Cholesky failed with damping %.3g; retrying with %.3g", name, damp, damp * 10)
            damp *= 10
    return None


def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    spec: ModuleSpec,
    *,
    act_order: bool = False,
    static_groups: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    name: str = "module",
    grid: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    clip: ClipSearch | None = None,
    group_params: str = "original",
) -> QuantizedWeight:
    """Quantize ``weight`` (out, in) with GPTQ against ``H`` (in, in); returns codes and group params.

    ``grid``: a fixed (scale, zero) per group (each of shape (out,)), e.g. learned clipping ranges;
    GPTQ then only decides the rounding, with error feedback, on that grid (as with static groups).
    ``clip``: search each group's range on its (error-updated) columns instead of taking min/max.
    ``group_params`` (static groups only): ``"original"`` fixes every group's scale/zero from the
    original weights before the solve (llm-compressor's static act-order); ``"reached"`` sets them
    when the solve first reaches one of the group's columns, from the group's error-updated values
    at that moment. Either way the groups stay contiguous (no g_idx at inference)."""
    if group_params not in ("original", "reached"):
        raise ValueError(f"group_params={group_params!r}: choose 'original' or 'reached'")
    H = H.detach().to(weight.device)  # (in, in), never modified: the factor works on its own copy
    out_f, in_f = weight.shape
    bits, maxq = spec.bits, max_code(spec.bits)
    gs = spec.group_size

    diag = H.diagonal().to(torch.float32)
    dead = diag == 0  # inputs that are always zero: any value works, pick 0
    perm = torch.arange(in_f, device=weight.device)
    if act_order:
        perm = torch.argsort(torch.where(dead, 1.0, diag), descending=True)
    invperm = torch.argsort(perm)
    W = weight.detach()[:, perm].to(torch.float32)  # (out, in) in permuted order, one working copy
    W[:, dead[perm]] = 0.0
    energy = diag[perm]  # each column's input energy (solve order): what a weighted range search weighs by

    U = _damped_factor(H, damp_percent, perm, name)
    if U is None:
        log.warning("%s: Cholesky failed even with %d× the damping; falling back to round-to-nearest", name, 10**DAMP_RETRIES)
        return rtn_quantize(weight, spec, clip)
    if clip is not None and clip.energy == "obs":
        energy = U.diagonal().to(torch.float32).pow(-2)  # what GPTQ's error term weighs column j by

    static_params, gs_eff = _fixed_group_params(W, invperm, spec, clip, grid, static_groups and act_order
                                                and group_params == "reached", static_groups, name, energy)

    if gs != -1 and block_size % gs != 0 and gs % block_size != 0:
        block_size = gs  # keep group starts aligned with blocks so group params see up-to-date columns

    codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=W.device)  # (out, in) in permuted order
    scales, zeros = [], []
    g_of_col = torch.zeros(in_f, dtype=torch.int32, device=W.device)  # group index, permuted order
    if gs == -1 and static_params is None:
        scale, zero = search_qparams(W, bits, spec.sym, clip, energy)
        scales.append(scale), zeros.append(zero)

    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()  # (out, B) columns of this block, updated in place
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static_params is not None:
                g = int(perm[col]) // gs_eff
                if static_params[g] is None:  # reached: the group's current values, all at or after col
                    pos = invperm[g * gs : (g + 1) * gs]
                    static_params[g] = _reached_params(W, W1, Err1, U, pos, i1, i, spec, clip, energy[pos])
                scale, zero = static_params[g]
                g_of_col[col] = g
            elif gs != -1:
                if col % gs == 0:
                    group_cols = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                    scale, zero = search_qparams(group_cols, bits, spec.sym, clip, energy[col : col + gs])
                    scales.append(scale), zeros.append(zero)
                g_of_col[col] = col // gs
            w = W1[:, i]  # (out,)
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            codes[:, col] = q
            err = (w - scale * (q - zero)) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if static_params is not None:
        scales = [s for s, _ in static_params]
        zeros = [z for _, z in static_params]
    return QuantizedWeight(
        intweight=codes[:, invperm],
        scales=torch.stack(scales),  # (n_groups, out)
        zeros=torch.stack(zeros).to(torch.int32),
        g_idx=g_of_col[invperm].contiguous(),
        bits=bits,
        group_size=gs,
        sym=spec.sym,
    )


def _fixed_group_params(W: torch.Tensor, invperm: torch.Tensor, spec: ModuleSpec, clip: ClipSearch | None,
                        grid: list | None, reached: bool, static_groups: bool, name: str,
                        energy: torch.Tensor) -> tuple[list | None, int]:
    """Each group's (scale, zero) fixed before the solve, or None per group for those set when the
    solve reaches them, or None for groups in solve order; and the group size that maps a column to
    its entry. ``W`` (out, in) is in solve order; groups are taken in the original column order."""
    out_f, in_f = W.shape
    gs = spec.group_size
    if grid is not None:
        if len(grid) != (1 if gs == -1 else -(-in_f // gs)):
            raise ValueError(f"{name}: a grid of {len(grid)} groups does not fit in_features={in_f} at group size {gs}.")
        return [(s.to(W.device, torch.float32), z.to(W.device, torch.float32)) for s, z in grid], (in_f if gs == -1 else gs)
    if gs == -1 or not static_groups:
        return None, gs
    if reached:
        return [None] * -(-in_f // gs), gs  # filled as the solve reaches each group
    return [search_qparams(W[:, invperm[g : g + gs]], spec.bits, spec.sym, clip, energy[invperm[g : g + gs]])
            for g in range(0, in_f, gs)], gs


def _reached_params(W: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, U: torch.Tensor, pos: torch.Tensor,
                    i1: int, i: int, spec: ModuleSpec, clip: ClipSearch | None, energy: torch.Tensor):
    """A group's (scale, zero) from its error-updated values when the solve, at column ``i1 + i``
    of the block that starts at ``i1``, first reaches it; ``pos``: its columns' solve positions."""
    i2 = i1 + W1.shape[1]
    now = pos < i2
    cur = torch.empty(W.shape[0], pos.numel(), device=W.device)  # (out, gs)
    cur[:, now] = W1[:, pos[now] - i1]
    later = pos[~now]
    cur[:, ~now] = W[:, later] - Err1[:, :i] @ U[i1 : i1 + i, later]  # the block's pending updates
    return search_qparams(cur, spec.bits, spec.sym, clip, energy)
