"""``QuantLinear``: a linear layer holding GPTQ-packed weights.

The forward pass goes through a kernel chosen from :data:`KERNELS`. Only the reference kernel
(unpack, dequantize, ``F.linear``) lives here; faster kernels register themselves under their own
name and are picked by :func:`select_kernel` (``HMQ_KERNEL=<name>`` forces one).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .packing import PackLayout, pack_gptq, unpack_gptq, unpack_rows
from .quantizer import QuantizedWeight, group_count

Kernel = Callable[["QuantLinear", torch.Tensor], torch.Tensor]
KERNELS: dict[str, Kernel] = {}


def register_kernel(name: str) -> Callable[[Kernel], Kernel]:
    def wrap(fn: Kernel) -> Kernel:
        KERNELS[name] = fn
        return fn

    return wrap


def dequantize_packed(qweight, qzeros, scales, g_idx, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Weight (out, in) in ``dtype`` from GPTQ-packed tensors; the reference every kernel must match.

    Works in the stored (in, out) orientation and returns a transposed view, which ``F.linear``
    consumes without a copy.
    """
    in_f, out_f = qweight.shape[0] * 32 // bits, qweight.shape[1]
    if 32 % bits == 0:  # whole codes per word: one broadcast shift along the packed axis
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device).view(1, -1, 1)
        codes = ((qweight.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(in_f, out_f)  # (in, out)
    else:
        codes = unpack_rows(qweight.T, bits, in_f).T  # (in, out)
    codes = codes.to(torch.float32)
    zeros = unpack_rows(qzeros, bits, out_f).to(torch.float32) + 1  # (n_groups, out)
    scales = scales.to(torch.float32)  # (n_groups, out)
    n_groups = scales.shape[0]
    gs = contiguous_group_size(g_idx, n_groups)
    if gs:  # groups are runs of rows: broadcast instead of gathering
        w = (codes.view(n_groups, gs, out_f) - zeros[:, None, :]) * scales[:, None, :]
        w = w.view(in_f, out_f)
    else:
        g = g_idx.long()  # (in,)
        w = (codes - zeros[g]) * scales[g]  # (in, out)
    return w.to(dtype).T  # (out, in)


def contiguous_group_size(g_idx: torch.Tensor, n_groups: int) -> int:
    """Rows per group when groups are equal runs of rows (no act-order, no partial group); else 0."""
    in_f = g_idx.numel()
    if in_f % n_groups:
        return 0
    gs = in_f // n_groups
    runs = torch.arange(in_f, device=g_idx.device, dtype=torch.int32) // gs
    return gs if torch.equal(g_idx.to(torch.int32), runs) else 0


@register_kernel("torch")
def torch_kernel(layer: "QuantLinear", x: torch.Tensor) -> torch.Tensor:
    w = layer._cached
    if w is None or w.dtype != x.dtype or w.device != x.device:
        w = dequantize_packed(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, x.dtype)
        if layer.cache_dequantized:
            layer._cached = w
    return F.linear(x, w, None if layer.bias is None else layer.bias.to(x.dtype))


def select_kernel(device: torch.device) -> str:
    """``HMQ_KERNEL`` if set; else Triton on CUDA when it is installed; else the PyTorch reference."""
    from . import kernels

    kernels.load()
    forced = os.environ.get("HMQ_KERNEL")
    if forced:
        if forced not in KERNELS:
            from .config import ConfigError

            raise ConfigError(f"HMQ_KERNEL={forced!r} is not an available kernel here: choose one of {sorted(KERNELS)}, "
                              "or unset HMQ_KERNEL to let hmq pick.")
        return forced
    if device.type == "cuda" and "triton" in KERNELS:
        return "triton"
    return "torch"


class QuantLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` with packed ``bits``-bit weights (layout :attr:`PackLayout.GPTQ`)."""

    layout = PackLayout.GPTQ

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, sym: bool = False,
                 bias: bool = False, dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        n_groups = group_count(in_features, group_size)
        kw = dict(device=device)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.zeros(n_groups, out_features * bits // 32, dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16, **kw))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, **kw))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias else None)
        self.kernel: str | None = None  # None: choose on first call from the input's device
        self.cache_dequantized = False  # torch kernel: keep the dequantized weight (fast repeated CPU evals)
        self._cached: torch.Tensor | None = None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       dtype: torch.dtype = torch.float16) -> "QuantLinear":
        out_f, in_f = qw.shape
        layer = cls(in_f, out_f, qw.bits, qw.group_size, qw.sym, bias is not None, dtype, device=qw.intweight.device)
        for name, t in pack_gptq(qw).items():
            getattr(layer, name).copy_(t)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def _apply(self, fn, recurse=True):
        self._cached, self.kernel = None, None  # moved or cast: caches and kernel choice are stale
        self.__dict__.pop("_triton_rt", None)
        return super()._apply(fn, recurse)

    def unpack(self) -> QuantizedWeight:
        return unpack_gptq({"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx},
                           self.bits, self.group_size, self.sym)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_packed(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:  # chosen once per device (reset when the module moves)
            self.kernel = select_kernel(x.device)
        return KERNELS[self.kernel](self, x)

    @property
    def storage_bytes(self) -> int:
        """Bytes of weight storage: packed codes, scales and packed zeros (g_idx excluded, as a loader can rebuild it)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.qzeros, self.scales))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, bias={self.bias is not None}")


class dequantized_cache:
    """``with dequantized_cache(model):`` the PyTorch path keeps each layer's dequantized weight
    for the duration (memory of an fp model, much faster for many forward passes on a CPU)."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, QuantLinear)]

    def __enter__(self):
        for m in self.layers:
            m.cache_dequantized = True

    def __exit__(self, *exc):
        for m in self.layers:
            m.cache_dequantized, m._cached = False, None
