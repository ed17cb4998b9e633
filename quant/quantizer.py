"""Uniform affine quantization primitives and round-to-nearest (RTN).

A weight ``W`` of shape (out, in) is split along ``in`` into groups of ``group_size`` columns; each
(group, output row) pair has its own ``scale`` and integer ``zero``:

    q = clamp(round(w / scale) + zero, 0, 2**bits - 1)        w_hat = scale * (q - zero)

Zero points always lie in ``[1, 2**bits - 1]``: the GPTQ v1 checkpoint format stores ``zero - 1``
in ``bits`` bits, so a zero of 0 would wrap around for loaders that add the 1 back. When a group's
minimum is exactly 0 (all weights non-negative) we use zero = 1 and widen the scale to cover the max.
Scales are rounded to fp16 here, because that is how they are stored, so the codes are chosen
against the exact scale that the checkpoint will hold.
"""
from __future__ import annotations

import math

from dataclasses import dataclass

import torch

from .config import ModuleSpec


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes plus the group parameters that reconstruct a weight (unpacked form)."""

    intweight: torch.Tensor  # (out, in) uint8, codes in [0, 2**bits - 1]
    scales: torch.Tensor  # (n_groups, out) float32, each value exactly representable in fp16
    zeros: torch.Tensor  # (n_groups, out) int32, in [1, 2**bits - 1]
    g_idx: torch.Tensor  # (in,) int32, group of each input column
    bits: int
    group_size: int  # -1: one group spanning all input columns
    sym: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.intweight.shape)

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """Output rows ``start:stop`` (to split a stacked q/k/v solve back into modules)."""
        return QuantizedWeight(self.intweight[start:stop], self.scales[:, start:stop], self.zeros[:, start:stop],
                               self.g_idx, self.bits, self.group_size, self.sym)

    @staticmethod
    def cat_rows(parts: "list[QuantizedWeight]") -> "QuantizedWeight":
        """The inverse of :meth:`rows`: ``parts`` (same columns, groups and width) stacked by output row."""
        first = parts[0]
        return QuantizedWeight(torch.cat([p.intweight for p in parts]), torch.cat([p.scales for p in parts], 1),
                               torch.cat([p.zeros for p in parts], 1), first.g_idx, first.bits, first.group_size, first.sym)

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.intweight.to(device), self.scales.to(device), self.zeros.to(device),
                               self.g_idx.to(device), self.bits, self.group_size, self.sym)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = self.g_idx.long()
        w = (self.intweight.to(torch.float32) - self.zeros[g].T.to(torch.float32)) * self.scales[g].T  # (out, in)
        return w.to(dtype)


def row_errors(qw: "QuantizedWeight", weight: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per output row, the layer-output error ``ΔW_r H ΔW_rᵀ`` of ``qw`` against ``weight`` (out,)."""
    dW = qw.dequantize(torch.float32) - weight.to(torch.float32)
    return ((dW @ H.to(dW.device, torch.float32)) * dW).sum(1)


def best_rows(options: list["QuantizedWeight"], weight: torch.Tensor, H: torch.Tensor) -> tuple["QuantizedWeight", torch.Tensor]:
    """Per output row, the option with the lowest ``ΔW_r H ΔW_rᵀ``. Rows of a GPTQ solve are
    independent given ``H``, so mixing rows of solves with the same ``g_idx`` is itself a valid
    solve. Returns the mixed weight and the index of the option each row came from."""
    first = options[0]
    for o in options[1:]:
        if not (torch.equal(o.g_idx, first.g_idx) and (o.bits, o.group_size, o.sym) == (first.bits, first.group_size, first.sym)):
            raise ValueError("best_rows needs options with the same bits, groups and column order")
    errs = torch.stack([row_errors(o, weight, H) for o in options])  # (options, out)
    pick = errs.argmin(0)
    codes = torch.stack([o.intweight for o in options])[pick, torch.arange(pick.numel())]
    scales = torch.stack([o.scales for o in options]).gather(0, pick[None, None].expand(1, *first.scales.shape))[0]
    zeros = torch.stack([o.zeros for o in options]).gather(0, pick[None, None].expand(1, *first.zeros.shape))[0]
    return QuantizedWeight(codes, scales, zeros, first.g_idx, first.bits, first.group_size, first.sym), pick


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def compute_qparams(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of ``w`` (rows, cols) from its min/max, the range always holding 0."""
    w = w.to(torch.float32)
    return range_qparams(w.amin(dim=1), w.amax(dim=1), bits, sym)


def range_qparams(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for the ranges ``[xmin, xmax]`` (any shape), widened to hold 0."""
    maxq = max_code(bits)
    xmin = xmin.clamp(max=0.0)
    xmax = xmax.clamp(min=0.0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.round(-xmin / scale)
        # v1-exact: a zero of 0 is not representable; shift to 1 and stretch the scale over xmax.
        at_zero = zero < 1
        scale = torch.where(at_zero, xmax / (maxq - 1), scale)
        zero = zero.clamp(min=1.0, max=float(maxq))
    scale = scale.clamp_min(1e-7).to(torch.float16).to(torch.float32)
    return scale, zero


@dataclass(frozen=True)
class ClipSearch:
    """Search each group's range instead of taking its min/max (GPTQ's ``mse`` option): shrink both
    ends by ``1 - i/grid`` for ``i < maxshrink·grid`` and keep, per row, the grid with the lowest
    ``Σ |ŵ - w|^norm``. Outliers then saturate while the bulk of the group gets a finer step, which
    matters most at 2–3 bits. ``weighted``: where the solver knows each input's energy (GPTQ:
    ``diag(H)``), each column's error counts by it, ``Σ_j H_jj |ŵ_j - w_j|^norm``, as llama.cpp's
    importance matrix weighs its range search: a weight that meets a massive activation is then never
    clipped to spare the rest of its group (unweighted, SmolLM2's layer-11 ``down_proj``, whose two
    inputs carry 10⁵–10⁶× the median energy, lost 12–45% of its output to it at 3 bits per channel)."""

    grid: int = 100
    maxshrink: float = 0.8
    norm: float = 2.4
    weighted: bool = True
    power: float = 1.0  # the weights are diag(H) to this power (see ``weight_power``)
    # where the energies come from, in GPTQ: "diag" diag(H); "obs" 1/[U]_jj² with U the upper Cholesky
    # factor of H⁻¹ in solve order, the weight GPTQ's own error term err²/U_jj² gives column j (its
    # input energy left after the later columns' compensation: OBS's saliency denominator)
    energy: str = "diag"
    cap: float = 0.0  # > 0: no column weighs more than cap × the median weight of the columns searched together


def search_qparams(w: torch.Tensor, bits: int, sym: bool, clip: ClipSearch | None = None,
                   energy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``compute_qparams``, or with ``clip`` the per-row best of the shrunken ranges (rows, cols);
    ``energy`` (cols,): each column's input energy, which weighs its error when ``clip.weighted``."""
    if clip is None:
        return compute_qparams(w, bits, sym)
    w = w.to(torch.float32)
    weigh = energy is not None and clip.weighted
    if weigh:
        energy = energy.to(w.device, torch.float32).clamp_min(0)
        energy = energy if clip.power == 1.0 else energy.pow(clip.power)
        if clip.cap > 0:
            energy = torch.minimum(energy, clip.cap * energy.median())
        energy = energy / energy.mean().clamp_min(1e-30)  # a scale-free weighting (an all-zero one: unweighted)
        energy = torch.where(energy.sum() > 0, energy, torch.ones_like(energy))
    lo, hi = w.amin(dim=1), w.amax(dim=1)
    rows = w.shape[0]
    p = torch.tensor([1 - i / clip.grid for i in range(int(clip.maxshrink * clip.grid))], device=w.device)  # 1 first
    s_all, z_all = range_qparams(p[:, None] * lo, p[:, None] * hi, bits, sym)  # (shrinks, rows): the range shrunk
    # rows a few at a time, so the (shrinks, rows, cols) trial stays in cache on a CPU (one block on a GPU)
    chunk = max(1, (1 << (24 if w.is_cuda else 18)) // max(1, len(p) * w.shape[1]))
    pick = torch.empty(rows, dtype=torch.long, device=w.device)
    for a in range(0, rows, chunk):
        s, z, x = s_all[:, a : a + chunk, None], z_all[:, a : a + chunk, None], w[None, a : a + chunk]
        # round half to even as torch.round, by the fp32 magic number (exact below 2**22; beyond, the
        # clamp gives the same code): a third of round's time
        q = (x / s).add_(_MAGIC).sub_(_MAGIC).add_(z).clamp_(0, max_code(bits)).sub_(z).mul_(s)
        err = q.sub_(x).abs_().pow_(clip.norm)
        err = (err.mul_(energy) if weigh else err).sum(2).nan_to_num_(nan=math.inf, posinf=math.inf)  # (shrinks, rows)
        # the first (widest) of equal errors; never a shrink whose scale overflows fp16 (inf: a NaN error)
        pick[a : a + chunk] = err.argmin(0)
    idx = torch.arange(rows, device=w.device)
    return s_all[pick, idx], z_all[pick, idx]


def weight_power(bits: int) -> float:
    """The weighted range search's power of diag(H) at ``bits``: 1 from 3 bits up, 0.5 at 2, as selection
    text ranked them (docs/defaults.md, re-taken at the committed code: at w2g64 KL 1.418 with 0.5,
    1.489 unweighted, 1.625 with 1; at w3g64 0.398 with 1, 0.450 with 0.5, 0.477 unweighted)."""
    return 0.5 if bits <= 2 else 1.0


_MAGIC = 1.5 * 2**23


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` (rows, cols) for per-row ``scale``/``zero`` (rows,), as float."""
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, max_code(bits))


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize ``w`` (rows, cols); the result is what the packed model computes with."""
    return scale[:, None] * (quantize_codes(w, scale, zero, bits) - zero[:, None])


def group_count(in_features: int, group_size: int) -> int:
    """Groups along ``in``; a last, shorter group is allowed (GPTQ's reference does the same)."""
    return 1 if group_size == -1 else -(-in_features // group_size)


def storage_bytes(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """Bytes a GPTQ-layout module stores: packed codes, fp16 scales and packed zeros per (group,
    output); ``bits=16`` is the fp16 weight. Per weight: ``bits + (16 + bits)/group_size`` bits."""
    if bits == 16:
        return out_features * in_features * 2
    groups = group_count(in_features, group_size)
    return (out_features * in_features * bits + groups * out_features * (16 + bits)) // 8


def check_groupable(in_features: int, group_size: int, name: str = "module", partial_groups: bool = False) -> None:
    """Refuse a group size that does not divide ``in_features`` unless partial last groups are allowed."""
    if group_size != -1 and in_features % group_size != 0 and not partial_groups:
        divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
        raise ValueError(
            f"group size {group_size} does not divide in_features={in_features} of {name}: pick one that does "
            f"({', '.join(map(str, divisors)) or 'none of 32/64/128/256 does'}), -1 for per-channel, or allow a "
            "shorter last group with --partial-groups (GPTQModel and transformers load that; vLLM does not)."
        )


def rtn_quantize(weight: torch.Tensor, spec: ModuleSpec, clip: ClipSearch | None = None) -> QuantizedWeight:
    """Round-to-nearest: each group's min/max (or, with ``clip``, its searched range) sets its grid;
    no error feedback."""
    w = weight.detach().to(torch.float32)  # (out, in)
    out_f, in_f = w.shape
    gs = in_f if spec.group_size == -1 else spec.group_size
    n_groups = group_count(in_f, gs)
    scales = torch.empty(n_groups, out_f, device=w.device)
    zeros = torch.empty(n_groups, out_f, device=w.device)
    codes = torch.empty(out_f, in_f, device=w.device)
    for g in range(n_groups):
        cols = slice(g * gs, (g + 1) * gs)
        scale, zero = search_qparams(w[:, cols], spec.bits, spec.sym, clip)
        scales[g], zeros[g] = scale, zero
        codes[:, cols] = quantize_codes(w[:, cols], scale, zero, spec.bits)
    return QuantizedWeight(
        intweight=codes.to(torch.uint8),
        scales=scales,
        zeros=zeros.to(torch.int32),
        g_idx=(torch.arange(in_f, device=w.device) // gs).to(torch.int32),
        bits=spec.bits,
        group_size=spec.group_size,
        sym=spec.sym,
    )
