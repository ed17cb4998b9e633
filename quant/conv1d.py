"""GPT-2-style linears: transformers' ``Conv1D`` stores its weight as (in, out), the transpose of an
``nn.Linear``'s. hmq turns each one inside the decoder layers into a :class:`TransposedLinear`, an
``nn.Linear`` (weight (out, in)) that remembers that its checkpoint stores the transpose, so every
stage sees plain linears. Weights read from shards (:mod:`quant.stream`) are transposed on the way
in, and kept fp weights are written back transposed on export, so a checkpoint stays a valid
GPT-2 checkpoint for everything hmq does not pack.
"""
from __future__ import annotations

import torch
from torch import nn


class TransposedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight its checkpoint stores as (in, out), as ``Conv1D`` does."""


def _conv1d_type():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def linearize(module: nn.Module) -> int:
    """Replace every ``Conv1D`` under ``module`` by an equal :class:`TransposedLinear`, in place (on
    the meta device for a streamed skeleton); returns how many were replaced."""
    conv1d = _conv1d_type()
    found = [(name, m) for name, m in module.named_modules() if isinstance(m, conv1d)]
    for name, conv in found:
        w = conv.weight  # (in, out)
        lin = TransposedLinear(conv.nx, conv.nf, bias=conv.bias is not None, device=w.device, dtype=w.dtype)
        if w.device.type != "meta":
            with torch.no_grad():
                lin.weight.copy_(w.t())  # (out, in)
                if conv.bias is not None:
                    lin.bias.copy_(conv.bias)
        lin.requires_grad_(w.requires_grad)
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, lin)
    return len(found)


def transposed_names(model: nn.Module) -> set[str]:
    """Full names of the weights that the checkpoint stores transposed."""
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, TransposedLinear)}
