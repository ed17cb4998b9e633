"""The registry of reconstruction methods: name -> function(weight, H, spec, config, name) -> QuantizedWeight."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from . import dist
from .config import ConfigError, ModuleSpec, QuantConfig
from .gptq import gptq_quantize
from .quantizer import ClipSearch, QuantizedWeight, best_rows, rtn_quantize, weight_power

Method = Callable[[torch.Tensor, Optional[torch.Tensor], ModuleSpec, QuantConfig, str], QuantizedWeight]


class MethodInfo:
    """``row_independent``: each output row is quantized on its own given ``H``, so modules sharing an
    input (q/k/v) can be stacked into one call with identical results."""

    def __init__(self, fn: Method, needs_hessian: bool, help: str, row_independent: bool = True, affine: bool = False):
        self.fn, self.needs_hessian, self.help, self.row_independent = fn, needs_hessian, help, row_independent
        self.affine = affine  # learn AffineQuant transforms per block first (quant/affine.py), then quantize with fn
        self.needs_inputs = needs_hessian or affine


METHODS: dict[str, MethodInfo] = {}


def register(name: str, needs_hessian: bool, help: str, row_independent: bool = True,
             affine: bool = False) -> Callable[[Method], Method]:
    def wrap(fn: Method) -> Method:
        METHODS[name] = MethodInfo(fn, needs_hessian, help, row_independent, affine)
        return fn

    return wrap


def get_method(name: str) -> MethodInfo:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(sorted(METHODS))}.")
    return METHODS[name]


def solve(method: MethodInfo, weight: torch.Tensor, H: torch.Tensor | None, spec: ModuleSpec, config: QuantConfig,
          label: str) -> QuantizedWeight:
    """``method`` on ``weight`` (out, in). With several processes each solves a share of the output
    rows (row-independent methods treat every row on its own, given ``H``) and all receive the whole."""
    if dist.world() == 1 or not method.row_independent or weight.shape[0] < dist.world():
        return method.fn(weight, H, spec, config, label)
    rows = torch.arange(weight.shape[0]).tensor_split(dist.world())[dist.rank()]
    part = method.fn(weight[rows[0]: rows[-1] + 1], H, spec, config, label)
    return QuantizedWeight.cat_rows([p.to(weight.device) for p in dist.gather_all(part.to("cpu"))])


def clip_search(config, bits: int) -> ClipSearch | None:
    return ClipSearch(weighted=config.clip_weighted, power=weight_power(bits)) if config.clip else None


@register("rtn", needs_hessian=False, help="round-to-nearest on each group's min/max grid (baseline)")
def _rtn(weight, H, spec, config, name):
    return rtn_quantize(weight, spec, clip_search(config, spec.bits))


@register("gptq", needs_hessian=True, help="GPTQ: second-order error feedback with H = 2XXᵀ")
def _gptq(weight, H, spec, config, name, grid=None):
    clip = clip_search(config, spec.bits)
    kw = dict(act_order=config.act_order, static_groups=config.static_groups,
              group_params=config.group_params_for(spec.bits), damp_percent=config.damp_percent,
              block_size=config.block_size, name=name, grid=grid)
    qw = gptq_quantize(weight, H, spec, clip=clip, **kw)
    if grid is None and clip is not None and clip.weighted and config.clip_both:
        # rows are independent given H: each keeps the solve with the lower ΔW_r H ΔW_rᵀ
        other = gptq_quantize(weight, H, spec, clip=dataclasses.replace(clip, weighted=False), **kw)
        qw = best_rows([qw, other], weight.float(), H.float())[0]
    return qw


@register("affine", needs_hessian=False, affine=True,
          help="AffineQuant-style learned equivalent transforms per block, folded in, then RTN on the learned "
               "clipping ranges")
def _rtn_learned(weight, H, spec, config, name):
    return rtn_quantize(weight, spec)  # the weights are clamped to the learned ranges: min/max is that grid


register("affine+gptq", needs_hessian=True, affine=True,
         help="the affine transforms, folded in, then GPTQ's error-feedback rounding on the learned clipped "
              "grid")(_gptq)
