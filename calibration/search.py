"""Plumbing for the allocation search (:func:`quant.search.evolve`): a database of every unit's
quantized weights at every candidate, and the loss of the model stitched from it.

The database is built the way ``hmq quantize`` builds a model: layer by layer, each layer's
Hessians collected on the outputs of the layers in front *as quantized at the anchor allocation*
(true-sequential inside a layer too), so the stitched model at the anchor is the model quantize
builds, and a configuration near it is close to what quantize would build for it.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from quant.arch import Arch, decoder_layers
from quant.capture import collect_hessians, run_layer
from quant.config import QuantConfig
from quant.engine import sweep
from quant.methods import get_method
from quant.resume import placed
from quant.variants import Reference, WeightCache, swapped, variant_nlls

from .measure import anchor_swap
from .units import Candidate, Unit, member_weights, quantized_candidates, unit_weight, units_by_layer

if TYPE_CHECKING:
    from quant.resume import LayerState

log = logging.getLogger("hmq")


@torch.no_grad()
def candidate_database(model: nn.Module, arch: Arch, units: list[Unit], candidates: list[Candidate],
                       cost: list[list[float]], windows: torch.Tensor, config: QuantConfig, device: torch.device,
                       anchor: list[int], batch_size: int = 8, progress: bool = True,
                       state: "LayerState | None" = None) -> WeightCache:
    """Every (unit, candidate)'s quantized member weights (in the model's dtype), in a
    :class:`quant.variants.WeightCache` on disk (the caller closes it), each quantized on the inputs
    of the ``anchor`` model (candidate index per unit): the layers in front, and the linears of
    earlier sequential steps of its own layer, at their anchor candidates. ``state``: each finished
    layer is saved there (its weights in its folder), and a rerun goes on after the saved layers."""
    method = get_method(config.method)
    dtype = next(p for p in model.parameters()).dtype  # the weights quantize would run with, bit for bit
    steps = arch.sequential if config.true_sequential else (arch.linears,)
    by_layer = units_by_layer(units)
    db = WeightCache(state.folder / "weights" if state is not None else None)
    start = state.done if state is not None else 0
    for i in range(start):
        db.adopt(f"layer-{i:05d}")
    if start:
        log.info("resuming the candidate database from %s: %d of %d decoder layers were done", state.folder, start,
                 len(decoder_layers(model, arch)))

    def step(i, layer, inputs):
        prefix = f"{arch.layers}.{i}."
        done: list[int] = []
        for names in steps:
            ks = [k for k in by_layer.get(i, []) if units[k].members[0].removeprefix(prefix) in names]
            if not ks:
                continue
            with swapped(layer, prefix, anchor_swap(db, anchor, done)):
                hessians, _ = collect_hessians(layer, list(names), inputs, prefix, None, (), arch.shared_input)
            for k in ks:
                u = units[k]
                W = unit_weight(model, u)  # (out, in) fp32
                H = hessians[u.members[0].removeprefix(prefix)]
                for c, Wq in quantized_candidates(W, H, u, candidates, cost[k], config, method):
                    db.put(k, c, member_weights(model, u, Wq, dtype))
            done += ks
            del hessians
        db.flush(f"layer-{i:05d}")
        with swapped(layer, prefix, anchor_swap(db, anchor, by_layer.get(i, []))):
            outputs = run_layer(layer, inputs)
        if state is not None:
            state.save(i, {}, {}, {"hidden": [o.hidden for o in outputs]})
        return outputs

    try:
        sweep(model, arch, windows, device, step, batch_size=batch_size, keep=False, progress=progress,
              desc="candidate database", start=start, resume=lambda inputs: placed(state.streams()["hidden"], inputs))
    except BaseException:
        db.close()
        raise
    return db


class StitchedLoss:
    """``loss(choice, full)``: mean NLL on ``windows`` (n, seq) of the model with unit ``k`` at
    candidate ``choice[k]`` from ``database`` (fp weights for keep-16 candidates); on the first
    ``screen`` windows only when ``full`` is false. The best configuration scored on the full set so far
    is the reference: its decoder-layer boundaries are kept (:class:`quant.variants.Reference`), and a
    configuration that differs from it only from layer ``i`` on is computed from layer ``i``."""

    def __init__(self, model: nn.Module, arch: Arch, units: list[Unit], database: WeightCache, windows: torch.Tensor,
                 device: torch.device, screen: int = 1):
        self.units, self.db = units, database
        self.layers = len(decoder_layers(model, arch))
        self.by_layer = units_by_layer(units)
        self.n = len(windows)
        self.screen = max(1, min(screen, len(windows)))
        self.ref: list[int] | None = None
        self.best = math.inf
        # the first layer's inputs (embeddings, masks, positions) do not depend on any unit: captured once
        self.reference = Reference(model, arch, windows, device)

    def swap(self, choice):
        """Layer ``i`` -> the database weights of its units at ``choice`` (keep-16: the layer's own)."""
        return lambda i: anchor_swap(self.db, choice, self.by_layer.get(i, []))

    @torch.no_grad()
    def __call__(self, choice: list[int], full: bool) -> float:
        choice = list(choice)
        start = 0
        if self.ref is not None:
            changed = [self.units[k].layer for k in range(len(choice)) if choice[k] != self.ref[k]]
            start = min(changed) if changed else self.layers
        loss = variant_nlls(self.reference, [(start, self.swap(choice))], self.n if full else self.screen)[0]
        if full and loss < self.best:
            self.best = loss
            self.reference.build(self.swap(choice), start)  # boundaries in front of ``start`` are the old reference's
            self.ref = choice
        return loss
