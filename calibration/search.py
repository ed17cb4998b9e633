"""Plumbing for the allocation search (:func:`quant.search.evolve`): a database of every unit's
quantized weights at every candidate, and the loss of the model stitched from it.

The database is built the way ``hmq quantize`` builds a model: layer by layer, each layer's
Hessians collected on the outputs of the layers in front *as quantized at the anchor allocation*
(true-sequential inside a layer too), so the stitched model at the anchor is the model quantize
builds, and a configuration near it is close to what quantize would build for it.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from quant.arch import Arch, decoder_layers
from quant.config import QuantConfig
from quant.methods import get_method

from .capture import LayerInput, capture_layer_inputs, collect_hessians, run_layer
from .sensitivity import (Candidate, Unit, _anchor_weights, _loss_from, _swapped, member_weights, quantized_candidates,
                          unit_weight)

Database = dict[tuple[int, int], dict[str, torch.Tensor]]  # (unit, candidate) -> member name -> weight


@torch.no_grad()
def candidate_database(model: nn.Module, arch: Arch, units: list[Unit], candidates: list[Candidate],
                       cost: list[list[float]], windows: torch.Tensor, config: QuantConfig, device: torch.device,
                       anchor: list[int], batch_size: int = 8, progress: bool = True) -> Database:
    """Every (unit, candidate)'s quantized member weights (in the model's dtype, on the CPU: one model
    copy per candidate), each quantized on the
    inputs of the ``anchor`` model (candidate index per unit): the layers in front, and the linears
    of earlier sequential steps of its own layer, at their anchor candidates."""
    method = get_method(config.method)
    layers = decoder_layers(model, arch)
    dtype = next(model.parameters()).dtype  # the weights quantize would run with, bit for bit
    steps = arch.sequential if config.true_sequential else (arch.linears,)
    inputs = capture_layer_inputs(model, layers, windows, device, batch_size)
    by_layer: dict[int, list[int]] = {}
    for k, u in enumerate(units):
        by_layer.setdefault(u.layer, []).append(k)
    db: Database = {}
    for i in tqdm(range(len(layers)), desc="candidate database", disable=not progress, unit="layer"):
        layer = layers[i].to(device)
        prefix = f"{arch.layers}.{i}."
        done: list[int] = []
        for step in steps:
            ks = [k for k in by_layer.get(i, []) if units[k].members[0].removeprefix(prefix) in step]
            if not ks:
                continue
            with _swapped(model, _anchor_weights(db, anchor, done)):
                hessians, _ = collect_hessians(layer, list(step), inputs, prefix, None, (), arch.shared_input)
            for k in ks:
                u = units[k]
                W = unit_weight(model, u)  # (out, in) fp32
                H = hessians[u.members[0].removeprefix(prefix)]
                for c, Wq in quantized_candidates(W, H, u, candidates, cost[k], config, method):
                    db[(k, c)] = member_weights(model, u, Wq, dtype)
            done += ks
            del hessians
        with _swapped(model, _anchor_weights(db, anchor, by_layer.get(i, []))):
            inputs = run_layer(layer, inputs)
        layers[i] = layer.to("cpu")
    return db


class StitchedLoss:
    """``loss(choice, full)``: mean NLL on ``windows`` (n, seq) of the model with unit ``k`` at
    candidate ``choice[k]`` from ``database`` (fp weights for keep-16 candidates); on the first
    ``screen`` windows only when ``full`` is false. The best configuration scored on the full set so far
    is the reference: its decoder-layer outputs are cached, and a configuration that differs from it
    only from layer ``i`` on is computed from layer ``i``."""

    def __init__(self, model: nn.Module, arch: Arch, units: list[Unit], database: Database, windows: torch.Tensor,
                 device: torch.device, screen: int = 1):
        self.model, self.units, self.db, self.device = model, units, database, device
        self.layers = decoder_layers(model, arch)
        self.ids = windows.to(device)
        self.screen = max(1, min(screen, len(windows)))
        self.fp = {m: model.get_submodule(m).weight.data for u in units for m in u.members}
        self.ref: list[int] | None = None
        self.outs: list[torch.Tensor] = []  # the reference's decoder-layer outputs, all windows
        self.best = math.inf
        # the first layer's inputs (embeddings, masks, positions) do not depend on any unit: captured once
        self.inputs = capture_layer_inputs(model, self.layers, self.ids, device, len(self.ids))
        first = self.inputs[0]
        self.as_tuple = isinstance(self.layers[0].to(device)(first.hidden, **first.kwargs), tuple)

    def weights(self, choice, from_layer: int = 0) -> dict[str, torch.Tensor]:
        out = {}
        for k, u in enumerate(self.units):
            if u.layer >= from_layer:
                out.update(self.db.get((k, choice[k])) or {m: self.fp[m] for m in u.members})
        return out

    @torch.no_grad()
    def __call__(self, choice: list[int], full: bool) -> float:
        choice = list(choice)
        start = 0
        if self.ref is not None:
            changed = [self.units[k].layer for k in range(len(choice)) if choice[k] != self.ref[k]]
            start = min(changed) if changed else len(self.layers)
        n = len(self.ids) if full else self.screen
        outs = [o[:n] for o in self.outs[:start]]
        self.model.to(self.device)
        loss = _loss_from(self.model, self.layers, outs, self.as_tuple, self.ids[:n], start, self.weights(choice, start))
        if full and loss < self.best:
            self.best = loss
            self._set_reference(choice, start)
        return loss

    @torch.no_grad()
    def _set_reference(self, choice: list[int], start: int) -> None:
        """Cache ``choice``'s layer outputs; those in front of ``start`` are the old reference's."""
        h = self.inputs if start == 0 else [LayerInput(self.outs[start - 1], self.inputs[0].kwargs)]
        outs = self.outs[:start]
        with _swapped(self.model, self.weights(choice, start)):
            for layer in self.layers[start:]:
                h = run_layer(layer, h)
                outs.append(h[0].hidden)
        self.ref, self.outs = choice, outs
