"""Plumbing for the allocation search (:func:`quant.search.evolve`): a database of every unit's
quantized weights at every candidate, and the loss of the model stitched from it.

The database is built the way ``hmq quantize`` builds a model: layer by layer, each layer's
Hessians collected on the outputs of the layers in front *as quantized at the anchor allocation*
(true-sequential inside a layer too), so the stitched model at the anchor is the model quantize
builds, and a configuration near it is close to what quantize would build for it.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from quant import dist
from quant.arch import Arch, decoder_layers
from quant.capture import LayerInput, collect_hessians, run_layer
from quant.config import QuantConfig
from quant.engine import head_blocks, head_logits, head_on, sweep, visit
from quant.evaluate import top_k_kl, top_k_reference
from quant.methods import get_method
from quant.resume import layer_key, placed
from quant.variants import Reference, WeightCache, swapped, variant_nlls

from .measure import anchor_swap
from .units import Candidate, Unit, member_codes, member_weights, quantized_candidates, unit_weight, units_by_layer

if TYPE_CHECKING:
    from quant.resume import LayerState

log = logging.getLogger("hmq")


@torch.no_grad()
def candidate_database(model: nn.Module, arch: Arch, units: list[Unit], candidates: list[Candidate],
                       cost: list[list[float]], windows: torch.Tensor, config: QuantConfig, device: torch.device,
                       anchor: list[int], batch_size: int = 8, progress: bool = True,
                       state: "LayerState | None" = None, codes: WeightCache | None = None,
                       errors: dict[tuple[int, int], float] | None = None) -> WeightCache:
    """Every (unit, candidate)'s quantized member weights (in the model's dtype), in a
    :class:`quant.variants.WeightCache` on disk (the caller closes it), each quantized on the inputs
    of the ``anchor`` model (candidate index per unit): the layers in front, and the linears of
    earlier sequential steps of its own layer, at their anchor candidates. ``state``: each finished
    layer is saved there (its weights in its folder), and a rerun goes on after the saved layers.
    ``codes`` (another cache): each candidate's integer codes and group parameters too, members
    ``<name>.intweight``, ``.scales``, ``.zeros``, ``.g_idx``, to build the checkpoint from
    (:func:`calibration.select.assemble`). ``errors`` receives each (unit, candidate)'s relative
    output error on its inputs, tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) (kept in ``state`` with the layer)."""
    method = get_method(config.method)
    dtype = next(p for p in model.parameters()).dtype  # the weights quantize would run with, bit for bit
    by_layer = units_by_layer(units)
    part = f"-rank{dist.rank()}" if dist.world() > 1 else ""  # every process keeps every candidate (solves share rows)
    db = WeightCache(state.folder / f"weights{part}" if state is not None else None)
    start = state.done if state is not None else 0
    for i in range(start):
        db.adopt(layer_key(i))
        if codes is not None:
            codes.adopt(layer_key(i))
        if errors is not None:
            errors.update(_error_keys(state.saved(i)[1].get("errors", {})))
    if start:
        log.info("resuming the candidate database from %s: %d of %d decoder layers were done", state.folder, start,
                 len(decoder_layers(model, arch)))

    def step(i, layer, inputs):
        prefix, here = f"{arch.layers}.{i}.", arch.at(layer)
        done: list[int] = []
        errs: dict[str, dict[str, float]] = {}
        for names in here.sequential if config.true_sequential else (here.linears,):
            ks = [k for k in by_layer.get(i, []) if units[k].members[0].removeprefix(prefix) in names]
            if not ks:
                continue
            with swapped(layer, prefix, anchor_swap(db, anchor, done)):
                hessians, _ = collect_hessians(layer, list(names), inputs, prefix, None, (), here.shared_input)
            for k in ks:
                u = units[k]
                W = unit_weight(model, u)  # (out, in) fp32
                H = hessians[u.members[0].removeprefix(prefix)]
                energy = float(((W @ H) * W).sum())  # tr(W H Wᵀ)
                for c, qw in quantized_candidates(W, H, u, candidates, cost[k], config, method):
                    Wq = qw.dequantize(torch.float32)  # (out, in)
                    db.put(k, c, member_weights(model, u, Wq, dtype))
                    if codes is not None:
                        codes.put(k, c, member_codes(u, qw))
                    dW = Wq - W
                    errs.setdefault(str(k), {})[str(c)] = float(((dW @ H) * dW).sum()) / max(energy, 1e-30)
            done += ks
            del hessians
        db.flush(layer_key(i))
        if codes is not None:
            codes.flush(layer_key(i))
        if errors is not None:
            errors.update(_error_keys(errs))
        with swapped(layer, prefix, anchor_swap(db, anchor, by_layer.get(i, []))):
            outputs = run_layer(layer, inputs)
        if state is not None:
            state.save(i, {}, {"errors": errs}, {"hidden": [o.hidden for o in outputs]})
        return outputs

    try:
        sweep(model, arch, dist.shard_batches(windows, batch_size), device, step, batch_size=batch_size, keep=False,
              progress=progress, desc="candidate database", start=start,
              resume=lambda inputs: placed(state.streams()["hidden"], inputs))
    except BaseException:
        db.close()
        raise
    return db


def _error_keys(errs: dict[str, dict[str, float]]) -> dict[tuple[int, int], float]:
    """A layer's errors as kept in its saved meta (JSON keys) -> {(unit, candidate): error}."""
    return {(int(k), int(c)): e for k, row in errs.items() for c, e in row.items()}


class StitchedLoss:
    """``loss(choice, full)``: mean NLL on ``windows`` (n, seq) of the model with unit ``k`` at
    candidate ``choice[k]`` from ``database`` (fp weights for keep-16 candidates); on the first
    ``screen`` windows only when ``full`` is false. The best configuration scored on the full set so far
    is the reference: its decoder-layer boundaries are kept (:class:`quant.variants.Reference`), and a
    configuration that differs from it only from layer ``i`` on is computed from layer ``i``.
    ``score`` (:class:`KLScore` on the same windows): the value is that, not the NLL."""

    def __init__(self, model: nn.Module, arch: Arch, units: list[Unit], database: WeightCache, windows: torch.Tensor,
                 device: torch.device, screen: int = 1, score=None):
        self.units, self.db = units, database
        self.layers = len(decoder_layers(model, arch))
        self.by_layer = units_by_layer(units)
        self.n = len(windows)
        self.screen = max(1, min(screen, len(windows)))
        self.ref: list[int] | None = None
        self.best = math.inf
        self.score = score
        # the first layer's inputs (embeddings, masks, positions) do not depend on any unit: captured once
        self.reference = Reference(model, arch, windows, device)

    def swap(self, choice):
        """Layer ``i`` -> the database weights of its units at ``choice`` (keep-16: the layer's own)."""
        return lambda i: anchor_swap(self.db, choice, self.by_layer.get(i, []))

    def _start(self, choice: list[int]) -> int:
        """The first layer where ``choice`` differs from the reference's configuration."""
        if self.ref is None:
            return 0
        changed = [self.units[k].layer for k in range(len(choice)) if choice[k] != self.ref[k]]
        return min(changed) if changed else self.layers

    def __call__(self, choice: list[int], full: bool) -> float:
        return self.many([choice], full)[0]

    @torch.no_grad()
    def many(self, choices: list[list[int]], full: bool) -> list[float]:
        """The loss of each configuration in ``choices``: those that start at the same layer share
        its visits, and with several processes each computes a share. Each is computed on its own, so
        a value does not depend on the others (nor on the layer it is computed from). A first full
        score with nothing kept builds the reference and scores from it, in one pass (every process
        runs it; the first one's value is everyone's)."""
        choices = [list(c) for c in choices]
        if full and self.ref is None and len(choices) == 1:  # nothing kept yet: one pass builds and scores
            ref = self.reference.build(self.swap(choices[0]), 0)
            if self.score is None:
                loss = ref.nll(self.n)
            else:
                with head_on(ref.model, ref.arch, ref.device):
                    loss = self.score(ref.inputs[-1].to(ref.device), self.n)
            loss = dist.gather_all(loss if dist.is_main() else None)[0]  # one value on every process, to compare
            self.best, self.ref = loss, choices[0]
            return [loss]
        starts = [self._start(c) for c in choices]
        losses = variant_nlls(self.reference, [(s, self.swap(c)) for s, c in zip(starts, choices)],
                              self.n if full else self.screen, score=self.score)
        if full and choices:
            j = min(range(len(choices)), key=lambda j: losses[j])
            if losses[j] < self.best:
                self.best = losses[j]
                self.reference.build(self.swap(choices[j]), starts[j])  # those in front of the start are kept
                self.ref = choices[j]
        return losses


class KLScore:
    """``score(hidden, n)``: mean KL(fp ‖ model) per predicted token on the first ``n`` of ``windows``
    (n, seq), from a model's last decoder-layer output ``hidden`` (n, seq, hidden), with the fp
    model's next-token distributions kept as their top ``k`` plus the rest as one outcome
    (:func:`quant.evaluate.top_k_kl`): (windows, seq - 1, k) indices and log-probabilities, a few MB
    where the whole distributions would take windows × seq × vocab. The fp side costs one sweep of
    the fp model over ``windows`` here, keeping no layer boundary but the last."""

    def __init__(self, model: nn.Module, arch: Arch, windows: torch.Tensor, device: torch.device, k: int = 128):
        self.model, self.arch, self.device = model, arch, device
        last = last_boundary(model, arch, windows, device)  # (n, seq, hidden) on the CPU
        n, self.seq = windows.shape
        k = min(k, model.get_output_embeddings().weight.shape[0])
        self.idx = torch.empty(n, self.seq - 1, k, dtype=torch.int32)
        self.top = torch.empty(n, self.seq - 1, k)
        with head_on(model, arch, device):
            for w, a, b in head_blocks(n, self.seq - 1):
                i, t = top_k_reference(head_logits(model, arch, last[w, a:b].to(device)).flatten(0, 1), k)
                self.idx[w, a:b] = i.view(-1, b - a, k).cpu()
                self.top[w, a:b] = t.view(-1, b - a, k).cpu()

    def rows(self, rows: torch.Tensor) -> "KLScore":
        """The same score on those of its windows (by index), in that order."""
        view = copy.copy(self)
        view.idx, view.top = self.idx[rows], self.top[rows]
        return view

    def each(self) -> "KLScore":
        """The same score, per window: ``score(hidden, n)`` gives each of the ``n`` windows' mean KL
        (a list), whose mean is the plain score's value."""
        view = copy.copy(self)
        view.per_window = True
        return view

    per_window = False

    def __call__(self, hidden: torch.Tensor, n: int) -> float | list[float]:
        total = 0.0
        sums = torch.zeros(n, dtype=torch.float64)
        for w, a, b in head_blocks(n, self.seq - 1):
            logits = head_logits(self.model, self.arch, hidden[w, a:b].to(self.device)).flatten(0, 1)
            kl = top_k_kl(logits, self.idx[w, a:b].flatten(0, 1).to(logits.device),
                          self.top[w, a:b].flatten(0, 1).to(logits.device))
            if self.per_window:
                sums[w] += kl.view(-1, b - a).sum(1).double().cpu()
            else:
                total += float(kl.sum())
        if self.per_window:
            return (sums / (self.seq - 1)).tolist()
        return total / (n * (self.seq - 1))


class Redrawn:
    """A :class:`StitchedLoss` whose windows are drawn afresh (``draw(d)``): set ``d`` takes
    ``samples`` of the ``pool`` windows at random (seeded by ``seed`` and ``d``; set 0 is the first
    ``samples``), their fp distributions from one :class:`KLScore` over the pool (``score``). Every
    set's loss starts from nothing kept: the first full call on it builds its reference."""

    def __init__(self, model: nn.Module, arch: Arch, units: list[Unit], database: WeightCache, pool: torch.Tensor,
                 device: torch.device, samples: int, screen: int, score: KLScore, seed: int = 0):
        self.args = (model, arch, units, database)
        self.pool, self.device, self.samples, self.screen, self.pool_score, self.seed = (
            pool, device, min(samples, len(pool)), screen, score, seed)
        self.draw(0)

    def draw(self, d: int) -> None:
        n = len(self.pool)
        rows = (torch.arange(self.samples) if d == 0 else
                torch.from_numpy(np.random.default_rng([self.seed, d]).choice(n, self.samples, replace=False)))
        self.rows = rows
        self.score = self.pool_score.rows(rows)
        self.loss = StitchedLoss(*self.args, self.pool[rows], self.device, self.screen, score=self.score)

    @property
    def windows(self) -> torch.Tensor:
        return self.pool[self.rows]

    def __call__(self, choice: list[int], full: bool) -> float:
        return self.loss(choice, full)

    def many(self, choices: list[list[int]], full: bool) -> list[float]:
        return self.loss.many(choices, full)


@torch.no_grad()
def last_boundary(model: nn.Module, arch: Arch, windows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The last decoder layer's output on ``windows`` (n, seq), on the CPU, from one sweep that keeps
    no other boundary; every process computes it whole."""
    ref = Reference(model, arch, windows, device)
    x = ref.inputs[0].to(device)
    for _, layer in visit(model, arch, range(ref.layers), device, keep=False, progress=False):
        x = run_layer(layer, [LayerInput(x, ref.kwargs)])[0].hidden
    return x.cpu()
