"""AffineQuant-style reconstruction: learned equivalent transforms, folded into the weights.

For one decoder block, transforms that leave the full-precision block *exactly* equivalent are
learned to make its weights easier to quantize, minimising the block's output error against the
full-precision block with the quantizer in the loop (straight-through rounding, learnable clipping
of each group's range, as in OmniQuant's LWC):

- a full invertible ``A_g`` (head_dim × head_dim) per key/value head between ``v_proj`` and
  ``o_proj``: attention is linear in V, so ``P(V A) = (P V) A``; ``v_proj``'s rows of head ``g``
  become ``A_gᵀ W_v`` and ``o_proj``'s columns of every query head reading ``g`` become
  ``W_o A_g⁻ᵀ`` (grouped-query heads share their KV head's matrix);
- per-channel scales where only a diagonal folds exactly: into the RMSNorm weights in front of
  q/k/v (``w/s``, ``W·diag(s)``) and gate/up, and between up and down (``diag(1/s)·W_up``,
  ``W_down·diag(s)``: SiLU(gate) multiplies elementwise, so a full matrix would not commute);
- invertibility by AffineQuant's gradual mask: the first epoch learns the diagonal only, the band
  of off-diagonals widens epoch by epoch, and after every step each row of ``A_g`` is projected
  back to strict diagonal dominance (Levy–Desplanques: such a matrix is invertible).

After learning, :func:`fold` writes the transforms into the block's weights in fp32, and the
pipeline quantizes the folded block with RTN (on the learned clipping ranges) or GPTQ.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .config import ConfigError, ModuleSpec
from .quantizer import compute_qparams, group_count

log = logging.getLogger("hmq")

Q, K, V, O = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
GATE, UP, DOWN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
NORM1, NORM2 = "input_layernorm", "post_attention_layernorm"
LINEARS = (Q, K, V, O, GATE, UP, DOWN)
MAX_COND = 1e4  # a transform this ill-conditioned loses too much precision in fp16 weights
DOMINANCE = 0.95  # off-diagonal row sums are kept below this fraction of the diagonal


class AffineError(ConfigError):
    """A learned transform became unusable; the message names the block."""


@dataclass(frozen=True)
class Heads:
    n_heads: int
    n_kv: int
    head_dim: int

    @classmethod
    def of(cls, config) -> "Heads":
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        return cls(n_heads, n_kv, head_dim)


class BlockTransforms(nn.Module):
    """The learnable transforms and clipping factors of one decoder block."""

    def __init__(self, layer: nn.Module, heads: Heads, specs: dict[str, ModuleSpec | None]):
        super().__init__()
        hidden = layer.get_submodule(Q).in_features
        inter = layer.get_submodule(DOWN).in_features
        dev = layer.get_submodule(Q).weight.device
        self.heads = heads
        self.log_s_attn = nn.Parameter(torch.zeros(hidden, device=dev))
        self.log_s_mlp = nn.Parameter(torch.zeros(hidden, device=dev))
        self.log_s_down = nn.Parameter(torch.zeros(inter, device=dev))
        self.A = nn.Parameter(torch.eye(heads.head_dim, device=dev).repeat(heads.n_kv, 1, 1))
        self.clip = nn.ParameterDict()  # per linear: (out, groups, 2) logits of the upper/lower clip factors
        for n, spec in specs.items():
            if spec is not None:
                lin = layer.get_submodule(n)
                groups = group_count(lin.in_features, spec.group_size)
                self.clip[n.replace(".", "_")] = nn.Parameter(torch.full((lin.out_features, groups, 2), 4.0, device=dev))

    def band(self, width: int) -> torch.Tensor:
        """A_g with only diagonals |i−j| ≤ width free (the gradual mask)."""
        hd = self.heads.head_dim
        idx = torch.arange(hd, device=self.A.device)
        mask = ((idx[:, None] - idx[None, :]).abs() <= width).to(self.A.dtype)
        return self.A * mask

    @torch.no_grad()
    def project(self, width: int) -> None:
        """Zero what the mask hides and restore strict diagonal dominance row by row."""
        self.A.copy_(self.band(width))
        diag = torch.diagonal(self.A, dim1=1, dim2=2)  # (n_kv, hd)
        off = self.A.abs().sum(-1) - diag.abs()
        limit = DOMINANCE * diag.abs()
        shrink = torch.where(off > limit, limit / off.clamp_min(1e-12), torch.ones_like(off))
        eye = torch.eye(self.heads.head_dim, device=self.A.device, dtype=torch.bool)
        self.A.copy_(torch.where(eye, self.A, self.A * shrink[..., None]))


def transformed_weights(base: dict[str, torch.Tensor], T: BlockTransforms, width: int) -> dict[str, torch.Tensor]:
    """The block's weights with the transforms applied (differentiable in ``T``); exact in exact arithmetic."""
    h = T.heads
    s1, s2, s3 = T.log_s_attn.exp(), T.log_s_mlp.exp(), T.log_s_down.exp()
    A = T.band(width)  # (n_kv, hd, hd)
    A_inv_t = torch.linalg.inv(A).transpose(1, 2)
    out = dict(base)
    out[f"{NORM1}.weight"] = base[f"{NORM1}.weight"] / s1
    for n in (Q, K):
        out[f"{n}.weight"] = base[f"{n}.weight"] * s1
    wv = (base[f"{V}.weight"] * s1).view(h.n_kv, h.head_dim, -1)  # rows of each KV head
    out[f"{V}.weight"] = (A.transpose(1, 2) @ wv).reshape(h.n_kv * h.head_dim, -1)
    if f"{V}.bias" in base:
        out[f"{V}.bias"] = (A.transpose(1, 2) @ base[f"{V}.bias"].view(h.n_kv, h.head_dim, 1)).reshape(-1)
    per_kv = h.n_heads // h.n_kv
    wo = base[f"{O}.weight"].view(-1, h.n_kv, per_kv, h.head_dim)  # (hidden, kv, heads per kv, hd)
    out[f"{O}.weight"] = torch.einsum("okpd,kde->okpe", wo, A_inv_t).reshape(wo.shape[0], -1)
    out[f"{NORM2}.weight"] = base[f"{NORM2}.weight"] / s2
    out[f"{GATE}.weight"] = base[f"{GATE}.weight"] * s2
    out[f"{UP}.weight"] = base[f"{UP}.weight"] * s2 / s3[:, None]
    if f"{UP}.bias" in base:
        out[f"{UP}.bias"] = base[f"{UP}.bias"] / s3
    out[f"{DOWN}.weight"] = base[f"{DOWN}.weight"] * s3
    return out


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def clip_ranges(w: torch.Tensor, spec: ModuleSpec, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grouped view of ``w`` (out, groups, gs; zero-padded) and each group's clipped (xmin, xmax)."""
    out_f, in_f = w.shape
    gs = in_f if spec.group_size == -1 else spec.group_size
    groups = group_count(in_f, spec.group_size)
    wg = F.pad(w, (0, groups * gs - in_f)).view(out_f, groups, gs)
    f = torch.sigmoid(logits)  # (out, groups, 2) in (0, 1): upper, lower
    xmax = wg.amax(-1).clamp(min=0) * f[..., 0]
    xmin = wg.amin(-1).clamp(max=0) * f[..., 1]
    if spec.sym:
        xmax = torch.maximum(xmax, -xmin)
        xmin = -xmax
    return wg, xmin, xmax


def fake_quantize(w: torch.Tensor, spec: ModuleSpec, logits: torch.Tensor) -> torch.Tensor:
    """Quantize–dequantize ``w`` on the clipped grid with straight-through rounding (differentiable)."""
    maxq = (1 << spec.bits) - 1
    wg, xmin, xmax = clip_ranges(w, spec, logits)
    scale = ((xmax - xmin) / maxq).clamp_min(1e-8)[..., None]
    zero = (maxq + 1) // 2 if spec.sym else _RoundSTE.apply(-xmin[..., None] / scale)
    q = torch.clamp(_RoundSTE.apply(wg / scale) + zero, 0, maxq)
    return ((q - zero) * scale).reshape(w.shape[0], -1)[:, : w.shape[1]]


@dataclass
class AffineSettings:
    epochs: int = 10
    lr: float = 5e-3  # transforms
    clip_lr: float = 1e-2  # clipping logits
    batch_size: int = 1  # calibration batches per optimizer step (their gradients averaged), over all processes


@dataclass
class Spread:
    """How each optimizer step's batches are spread over processes (data-parallel; one process is
    the default). Process ``r`` holds global batches ``r, r + processes, ...`` (``quant.dist``'s
    ``shard_batches``), so a step over global batches ``[s·B, (s+1)·B)`` takes the next
    ``B / processes`` of each process's own; ``reduce`` sums a tensor over the processes in place."""

    processes: int = 1
    total: int | None = None  # batches over all processes (None: this process's, one process)
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None  # None: one process, nothing to sum


def learn_block(layer: nn.Module, heads: Heads, specs: dict[str, ModuleSpec | None], inputs: list,
                targets: list[torch.Tensor], settings: AffineSettings, name: str = "block",
                spread: Spread | None = None) -> tuple[BlockTransforms, dict]:
    """Learn the transforms of ``layer`` so that, quantized, it maps ``inputs`` (LayerInput batches,
    from the already quantized model) close to ``targets`` (the fp block's outputs). Each optimizer
    step averages the gradients of ``settings.batch_size`` batches; under ``spread`` those batches
    come from several processes and their gradient sums are all-reduced, so every process takes the
    step one process would take. Returns the transforms and per-epoch mean losses; the layer itself
    is not modified."""
    spread = spread or Spread()
    reduce = spread.reduce or (lambda t: t)
    batch = settings.batch_size
    if batch < 1 or batch % spread.processes:
        raise ConfigError(f"{name}: an affine step of {batch} batches cannot be spread over {spread.processes} "
                          "processes: use a multiple of the process count.")
    own = batch // spread.processes  # this process's batches in each step
    total = len(inputs) if spread.total is None else spread.total
    for p in layer.parameters():
        p.requires_grad_(False)
    base = {k: v.detach().float() for k, v in layer.state_dict().items() if k.endswith((".weight", ".bias"))}
    T = BlockTransforms(layer, heads, specs).float()
    params = list(T.parameters())
    for p in params:  # zeros, not None: a process with no batch in a step still adds its part
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW([{"params": [T.log_s_attn, T.log_s_mlp, T.log_s_down, T.A], "lr": settings.lr},
                             {"params": list(T.clip.values()), "lr": settings.clip_lr}], weight_decay=0.0)
    history = []
    dtype = next(layer.parameters()).dtype
    for epoch in range(settings.epochs):
        width = 0 if settings.epochs == 1 else round(epoch * (heads.head_dim - 1) / (settings.epochs - 1))
        loss_sum = 0.0
        for step in range(math.ceil(total / batch)):
            opt.zero_grad(set_to_none=False)
            for x, y in zip(inputs[step * own:(step + 1) * own], targets[step * own:(step + 1) * own]):
                with torch.enable_grad():
                    weights = transformed_weights(base, T, width)
                    for n, spec in specs.items():
                        if spec is not None:
                            weights[f"{n}.weight"] = fake_quantize(weights[f"{n}.weight"], spec, T.clip[n.replace(".", "_")])
                    weights = {k: v.to(dtype) for k, v in weights.items()}
                    out = functional_call(layer, weights, (x.hidden,), x.kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    loss = F.mse_loss(out.float(), y.float())
                    loss.backward()  # gradients add up over the step's batches
                loss_sum += float(loss.detach())
            for p in params:
                reduce(p.grad).div_(min(batch, total - step * batch))  # the mean over the step's batches
            opt.step()
            T.project(width)
        history.append(float(reduce(torch.tensor([loss_sum], dtype=torch.float64, device=T.A.device))) / total)
        if not math.isfinite(history[-1]):
            raise AffineError(f"{name}: the affine loss became {history[-1]} in epoch {epoch}: lower --affine-lr.")
    log.debug("%s affine loss by epoch: %s", name, ", ".join(f"{v:.3g}" for v in history))
    return T, {"loss": history}


@torch.no_grad()
def fold(layer: nn.Module, T: BlockTransforms, name: str = "block") -> None:
    """Write the learned transforms into ``layer``'s weights (fp32 math); the fp block is unchanged
    in function. Refuses a transform too ill-conditioned to survive in half-precision weights."""
    hd = T.heads.head_dim
    A = T.band(hd)
    cond = torch.linalg.cond(A.double())
    if not bool(torch.isfinite(cond).all()) or float(cond.max()) > MAX_COND:
        worst = int(cond.nan_to_num(float("inf")).argmax())
        raise AffineError(f"{name}: the learned transform of key/value head {worst} is ill-conditioned "
                          f"(condition number {float(cond[worst]):.3g} > {MAX_COND:g}); lower --affine-lr or "
                          "--affine-epochs, or use --method gptq for this model.")
    base = {k: v.detach().float() for k, v in layer.state_dict().items() if k.endswith((".weight", ".bias"))}
    new = transformed_weights(base, T, hd)
    for k, v in new.items():
        target = layer.get_parameter(k)
        target.data = v.to(target.dtype)


def _clamped(w: torch.Tensor, spec: ModuleSpec, logits: torch.Tensor) -> torch.Tensor:
    """``w`` clamped to each group's learned clipped range (same shape as ``w``)."""
    wg, xmin, xmax = clip_ranges(w, spec, logits)
    wg = torch.maximum(torch.minimum(wg, xmax[..., None]), xmin[..., None])
    return wg.reshape(w.shape[0], -1)[:, : w.shape[1]]


@torch.no_grad()
def clamp_to_clip(layer: nn.Module, T: BlockTransforms, specs: dict[str, ModuleSpec | None]) -> None:
    """Clamp each folded weight to its learned group ranges, so that RTN's min/max grid *is* the
    learned clipped grid (values outside are rounded to the edge, as in the learning loop)."""
    for n, spec in specs.items():
        if spec is not None:
            lin = layer.get_submodule(n)
            lin.weight.data = _clamped(lin.weight.float(), spec, T.clip[n.replace(".", "_")]).to(lin.weight.dtype)


@torch.no_grad()
def learned_grid(layer: nn.Module, T: BlockTransforms, specs: dict[str, ModuleSpec | None]) -> dict[str, list]:
    """Per linear, the (scale, zero) of each group on its learned clipped range (the grid RTN uses
    after :func:`clamp_to_clip`), for GPTQ to round on with error feedback."""
    grids = {}
    for n, spec in specs.items():
        if spec is None:
            continue
        w = layer.get_submodule(n).weight.float()
        clamped = _clamped(w, spec, T.clip[n.replace(".", "_")])
        gs = w.shape[1] if spec.group_size == -1 else spec.group_size
        grids[n] = [compute_qparams(clamped[:, g : g + gs], spec.bits, spec.sym) for g in range(0, w.shape[1], gs)]
    return grids
