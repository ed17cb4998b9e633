"""Activation capture for the sequential pipeline: the inputs of the first decoder layer, passes of
one layer over stored inputs, forward hooks that feed Hessian accumulators, and *replay* of blocks
that are already quantized.

Cost model (why replay exists): with true-sequential GPTQ each decoder layer is run once per
sequential step plus once more for its outputs. Hooks stop a pass as soon as the modules of the
current step have seen their inputs, and a block whose linears are all quantized (attention once
``o_proj`` is done, the MLP once ``down_proj`` is done) is not recomputed: its output is
``out_linear(cached input)``, exactly what the block would return. This cuts the CPU time of a
layer by about half without changing any number.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .hessian import HessianAccumulator
from .moe import all_experts


class StopForward(Exception):
    """Raised by a hook to end a forward pass early once the needed inputs are captured."""


@dataclass
class LayerInput:
    hidden: torch.Tensor  # (batch, seq, hidden)
    kwargs: dict[str, Any]  # attention mask, position ids/embeddings, ... as the model passed them


@dataclass
class Replay:
    """Outputs of already-quantized blocks, one per stored batch; installed while a layer runs."""

    outputs: dict[str, list[Any]] = field(default_factory=dict)  # block module name -> per-batch outputs
    batch: int = 0

    def install(self, layer: nn.Module) -> list[tuple[nn.Module, Any]]:
        patched = []
        for name, outs in self.outputs.items():
            module = layer.get_submodule(name)
            patched.append((module, module.__dict__.get("forward")))
            module.forward = lambda *a, _outs=outs, **k: _outs[self.batch]
        return patched

    @staticmethod
    def uninstall(patched: list[tuple[nn.Module, Any]]) -> None:
        for module, previous in patched:
            if previous is None:
                del module.forward
            else:
                module.forward = previous


LAYER_KWARGS = "hmq_layer_kwargs"  # in a LayerInput's kwargs where layers take different ones (see below)
_SKIPPED = ("hidden_states", "past_key_values", "past_key_value", "cache")


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, device: torch.device,
                         batch_size: int = 8) -> list[LayerInput]:
    """Run the model up to its first decoder layer on ``windows`` (n, seq); returns that layer's inputs.

    Only the modules in front of the layers (embeddings, rotary tables, norms) move to ``device``.
    The decoder layers themselves are not computed: each is stood in for by a pass-through that
    records the keyword arguments the model hands it. Where layers take different ones (Gemma-3's
    sliding-window layers get their own mask and rotary tables), the first layer's inputs carry
    every kind under :data:`LAYER_KWARGS` and a hook on each layer swaps its own in, so whoever
    runs layer ``i`` on stored inputs gets what the model itself would pass it.
    """
    inner = next(m for m in model.modules() if any(c is layers for c in m.children()))
    moved = [c for c in inner.children() if c is not layers]
    for c in moved:
        c.to(device)
    captured: list[LayerInput] = []
    seen: list[dict] = []  # this batch's kwargs, one per layer

    def stand_in(j):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen.append({k: v for k, v in kwargs.items() if k not in _SKIPPED})
            if j == 0:
                captured.append(LayerInput(hidden.detach(), {}))
            if j == len(layers) - 1:
                raise StopForward
            return hidden

        return forward

    for j, layer in enumerate(layers):
        layer.forward = stand_in(j)
    try:
        for b in range(0, windows.shape[0], batch_size):
            seen.clear()
            try:
                model(input_ids=windows[b : b + batch_size].to(device), use_cache=False)
            except StopForward:
                pass
            captured[-1].kwargs = _per_layer(seen, layers)
    finally:
        for layer in layers:
            del layer.forward
        for c in moved:
            c.to("cpu")
    return captured


def _per_layer(seen: list[dict], layers: nn.ModuleList) -> dict:
    """The first layer's kwargs; with every distinct kind of them under :data:`LAYER_KWARGS` (and a
    hook installed on each layer that picks its own) where the layers do not all take the same."""
    kinds: list[dict] = []
    which = []
    for kw in seen:
        key = [i for i, k in enumerate(kinds) if k.keys() == kw.keys() and all(k[n] is kw[n] for n in kw)]
        if not key:
            kinds.append(kw)
        which.append(key[0] if key else len(kinds) - 1)
    first = {**seen[0], "use_cache": False}
    if len(kinds) == 1:
        return first
    for j, layer in enumerate(layers):
        if not getattr(layer, "_hmq_own_kwargs", False):
            layer.register_forward_pre_hook(_own_kwargs(j), with_kwargs=True)
            layer._hmq_own_kwargs = True
    return {**first, LAYER_KWARGS: (tuple(which), [{**k, "use_cache": False} for k in kinds])}


def _own_kwargs(j: int):
    def hook(module, args, kwargs):
        table = kwargs.pop(LAYER_KWARGS, None)
        if table is None:  # called as the model calls it
            return None
        which, kinds = table
        return args, {**kwargs, **kinds[which[j]]}

    return hook


def _output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[LayerInput], replay: Replay | None = None) -> list[LayerInput]:
    """The layer's outputs for every stored batch, ready to be the next layer's inputs."""
    replay = replay or Replay()
    patched = replay.install(layer)
    try:
        outs = []
        for b, x in enumerate(inputs):
            replay.batch = b
            outs.append(LayerInput(_output(layer(x.hidden, **x.kwargs)), x.kwargs))
        return outs
    finally:
        Replay.uninstall(patched)


@torch.no_grad()
def collect_hessians(layer: nn.Module, names: list[str], inputs: list[LayerInput], prefix: str = "",
                     replay: Replay | None = None, keep_inputs: tuple[str, ...] = (),
                     shared_input: tuple[tuple[str, ...], ...] = ()
                     ) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
    """``H = 2XXᵀ/n`` for each named linear of ``layer`` from one pass over ``inputs``.

    Modules listed together in ``shared_input`` (q/k/v, gate/up: the architecture feeds them the very
    same tensor) share one accumulator, and the first of them to run stands for all: the pass can stop
    before the others compute. The returned dict maps them to the same ``H`` object. Inputs of the
    modules in ``keep_inputs`` are returned too, one tensor per batch (for :class:`Replay`).
    """
    hooked = list(dict.fromkeys([*names, *keep_inputs]))
    partners = {n: [m for m in g if m in hooked] for g in shared_input for n in g if n in hooked}
    accs: dict[str, HessianAccumulator] = {}
    for n in names:
        if n not in accs:
            acc = HessianAccumulator(prefix + n)
            for m in partners.get(n, [n]):
                if m in names:
                    accs[m] = acc
    kept: dict[str, list[torch.Tensor]] = {n: [] for n in keep_inputs}
    seen: set[str] = set()
    handles = []

    def hook_for(n):
        def hook(module, args):
            if n in seen:
                return
            x = args[0]
            group = partners.get(n, [n])
            if n in accs:
                accs[n].add(x)
            for m in group:
                if m in kept:
                    kept[m].append(x.detach().clone())
            seen.update(group)
            if len(seen) == len(hooked):
                raise StopForward  # nothing later in the layer is needed

        return hook

    for n in hooked:
        handles.append(layer.get_submodule(n).register_forward_pre_hook(hook_for(n)))
    replay = replay or Replay()
    patched = replay.install(layer)
    try:
        with all_experts(layer, prefix):  # a MoE block's experts see every token (quant/moe.py)
            for b, x in enumerate(inputs):
                replay.batch = b
                seen.clear()
                try:
                    layer(x.hidden, **x.kwargs)
                except StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
        Replay.uninstall(patched)
    hessians, cache = {}, {}
    for n in names:
        acc = accs[n]
        if id(acc) not in cache:
            cache[id(acc)] = acc.hessian()
        hessians[n] = cache[id(acc)]
    return hessians, kept
