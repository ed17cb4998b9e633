"""The registry of reconstruction methods: name -> function(weight, H, spec, config, name) -> QuantizedWeight."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .config import ConfigError, ModuleSpec, QuantConfig
from .gptq import gptq_quantize
from .quantizer import QuantizedWeight, rtn_quantize

Method = Callable[[torch.Tensor, Optional[torch.Tensor], ModuleSpec, QuantConfig, str], QuantizedWeight]


class MethodInfo:
    """``row_independent``: each output row is quantized on its own given ``H``, so modules sharing an
    input (q/k/v) can be stacked into one call with identical results."""

    def __init__(self, fn: Method, needs_hessian: bool, help: str, row_independent: bool = True):
        self.fn, self.needs_hessian, self.help, self.row_independent = fn, needs_hessian, help, row_independent


METHODS: dict[str, MethodInfo] = {}


def register(name: str, needs_hessian: bool, help: str, row_independent: bool = True) -> Callable[[Method], Method]:
    def wrap(fn: Method) -> Method:
        METHODS[name] = MethodInfo(fn, needs_hessian, help, row_independent)
        return fn

    return wrap


def get_method(name: str) -> MethodInfo:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(sorted(METHODS))}.")
    return METHODS[name]


@register("rtn", needs_hessian=False, help="round-to-nearest on each group's min/max grid (baseline)")
def _rtn(weight, H, spec, config, name):
    return rtn_quantize(weight, spec)


@register("gptq", needs_hessian=True, help="GPTQ: second-order error feedback with H = 2XXᵀ")
def _gptq(weight, H, spec, config, name):
    return gptq_quantize(
        weight,
        H,
        spec,
        act_order=config.act_order,
        static_groups=config.static_groups,
        damp_percent=config.damp_percent,
        block_size=config.block_size,
        name=name,
    )
