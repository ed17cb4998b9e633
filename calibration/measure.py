"""The sensitivity measurement (:class:`calibration.sensitivity.Sensitivity`), in three stages on the
layer-sweep engine, so a model streamed from disk is measured in the memory of one decoder layer:

1. **layer errors** (:func:`quant.engine.sweep` over the calibration windows): each layer's input
   Hessians ``H_x``, and every unit quantized at every candidate, its ``‖ΔW‖²`` and
   ``tr(ΔW H_x ΔWᵀ)``; the quantized weights go to a :class:`quant.variants.WeightCache` on disk, and
   the fp model's boundary activations on the loss windows are stored on the way;
2. **curvature** (:mod:`calibration.curvature`): the Hessian trace (or Fisher) of every unit's
   linears, layer by layer;
3. **measured loss changes** (:func:`quant.variants.variant_nlls`): each unit alone, pairs, and, with
   an anchor, each unit at each candidate in the anchor model.
"""
from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Callable

import torch

from quant import dist
from quant.arch import Arch
from quant.capture import collect_hessians, run_layer
from quant.config import ConfigError, QuantConfig
from quant.engine import sweep
from quant.methods import get_method
from quant.resume import layer_key, placed
from quant.variants import Reference, WeightCache, swapped, variant_nlls

from .curvature import fisher_traces, hutchinson_traces
from .sensitivity import Sensitivity
from .units import (Candidate, Unit, build_units, candidate_cost, fingerprint, member_weights, overhead_bytes,
                    quantized_candidates, unit_weight, units_by_layer)

if TYPE_CHECKING:
    from quant.resume import LayerState

log = logging.getLogger("hmq")


def _context_anchor(units: list[Unit], candidates: list[Candidate], context_bits: int | None,
                    labels: list[str] | None) -> list[int] | None:
    """Candidate index per unit of the model measured around: uniform at ``context_bits`` (each unit
    at that width's first, default-group candidate), or the given candidate labels."""
    if labels is None:
        if context_bits is None:
            return None
        return [next(c for c, cand in enumerate(candidates) if cand.bits == context_bits)] * len(units)
    if context_bits is not None:
        raise ConfigError("give either --context-bits (a uniform model) or an anchor allocation, not both.")
    known = {cand.label: c for c, cand in enumerate(candidates)}
    if len(labels) != len(units) or any(lab not in known for lab in labels):
        bad = [lab for lab in labels if lab not in known][:3]
        raise ConfigError(f"the anchor allocation must give one of the candidates {sorted(known)} for each of the "
                          f"{len(units)} units; it gives {len(labels)}" + (f" (unknown: {bad})" if bad else "") + ".")
    return [known[lab] for lab in labels]


def anchor_swap(weights: WeightCache, anchor: list[int], ks) -> dict[str, torch.Tensor]:
    """The quantized member weights of units ``ks`` at their candidates in ``anchor`` (a candidate
    index per unit; none for a unit at fp16, or where its candidate does not apply: it stays at fp)."""
    return {m: w for k in ks for m, w in (weights.get((k, anchor[k])) or {}).items()}


class _LayerErrors:
    """Stage 1 as a sweep step: per-unit ``H_x`` trace and per-candidate errors, weights cached."""

    def __init__(self, model, arch, units, candidates, cost, config, weights: WeightCache, ref: Reference,
                 keep_bits: set[int], anchor: list[int] | None, sequential: bool, state: "LayerState | None"):
        self.model, self.arch, self.units, self.candidates, self.cost = model, arch, units, candidates, cost
        self.state = state  # saves each finished layer, for a rerun to go on from
        self.config, self.method, self.weights, self.ref = config, get_method(config.method), weights, ref
        self.keep_bits, self.anchor, self.sequential = keep_bits, anchor, sequential
        self.by_layer = units_by_layer(units)
        U, C = len(units), len(candidates)
        self.sqnorm = [[0.0] * C for _ in range(U)]
        self.out_err = [[0.0] * C for _ in range(U)]
        self.m_sqnorm = [[[0.0] * len(u.members) for _ in range(C)] for u in units]
        self.m_out_err = [[[0.0] * len(u.members) for _ in range(C)] for u in units]
        self.hx_trace = [0.0] * U

    def __call__(self, i, layer, inputs):
        prefix = f"{self.arch.layers}.{i}."
        here = self.arch.at(layer)
        hessians, _ = collect_hessians(layer, list(here.linears), inputs, prefix, None, (), here.shared_input)
        for k in self.by_layer.get(i, []):
            self._unit(k, prefix, hessians)
        del hessians
        self.weights.flush(layer_key(i))
        self.ref.extend(i, layer)  # the fp model's boundary on the loss windows
        ctx = anchor_swap(self.weights, self.anchor, self.by_layer.get(i, [])) if self.sequential else {}
        with swapped(layer, prefix, ctx):  # ``sequential``: the next layer's inputs come from the anchor model
            outputs = run_layer(layer, inputs)
        if self.state is not None:
            self.state.save(i, {"ref": self.ref.inputs[i + 1]}, self._row(i), {"hidden": [o.hidden for o in outputs]})
        return outputs

    _FIELDS = ("sqnorm", "out_err", "m_sqnorm", "m_out_err", "hx_trace")

    def _row(self, i: int) -> dict:
        """Layer ``i``'s units' numbers, as plain data."""
        return {str(k): [getattr(self, f)[k] for f in self._FIELDS] for k in self.by_layer.get(i, [])}

    def restore(self) -> int:
        """Take back the layers an earlier start of this measurement saved; returns the first to measure."""
        for i in range(self.state.done):
            tensors, row = self.state.saved(i)
            for k, values in row.items():
                for f, v in zip(self._FIELDS, values):
                    getattr(self, f)[int(k)] = v
            self.weights.adopt(layer_key(i))
            self.ref.inputs.append(tensors["ref"])
        return self.state.done

    def _unit(self, k, prefix, hessians):
        u = self.units[k]
        W = unit_weight(self.model, u)  # (out, in)
        H = hessians[u.members[0].removeprefix(prefix)]
        for m in u.members[1:]:
            if hessians[m.removeprefix(prefix)] is not H:
                raise ConfigError(f"{u.name}: its linears do not share one input, so they cannot be one unit; "
                                  "use --units linear.")
        self.hx_trace[k] = float(torch.diagonal(H).sum())
        for c, qw in quantized_candidates(W, H, u, self.candidates, self.cost[k], self.config, self.method):
            Wq = qw.dequantize(torch.float32)
            dW = Wq - W  # (out, in)
            per_row = ((dW @ H) * dW).sum(1)  # (out,) row r: ΔW_r H ΔW_rᵀ
            sq_row = dW.pow(2).sum(1)
            row = 0
            for m, rows in enumerate(u.member_out):
                self.m_out_err[k][c][m] = float(per_row[row : row + rows].sum())
                self.m_sqnorm[k][c][m] = float(sq_row[row : row + rows].sum())
                row += rows
            self.sqnorm[k][c] = float(sq_row.sum())
            self.out_err[k][c] = float(per_row.sum())  # tr(ΔW H ΔWᵀ)
            if self.candidates[c].bits in self.keep_bits:
                self.weights.put(k, c, member_weights(self.model, u, W + dW))


def _memo(state: "LayerState | None", key: str) -> dict:
    """``variant_nlls``'s ``known`` and ``on_batch`` for the passes kept under ``key`` in ``state``:
    a rerun measures only those an earlier start had not finished."""
    if state is None:
        return {}
    kept = {int(v): x for v, x in state.extra.get(key, {}).items()}

    def on_batch(results: dict[int, float]) -> None:
        kept.update(results)
        state.record(key, {str(v): x for v, x in kept.items()})

    return {"known": dict(kept), "on_batch": on_batch}


def _kept(state: "LayerState | None", key: str, compute: Callable[[], tuple]) -> tuple:
    """``compute()``, or what an earlier start of this measurement kept under ``key`` in ``state``."""
    if state is not None and key in state.extra:
        return tuple(state.extra[key])
    value = compute()
    if state is not None:
        state.record(key, list(value))
    return value


def _traces(model, arch, units, loss_windows, device, trace_method, trace_tol, max_probes, seed, progress):
    names = [f"{m}.weight" for u in units for m in u.members]
    if trace_method == "fisher":
        est = fisher_traces(model, arch, names, loss_windows, device, progress=progress)
    elif trace_method == "hutchinson":
        est = hutchinson_traces(model, arch, names, loss_windows, device, tol=trace_tol, max_probes=max_probes,
                                seed=seed, progress=progress)
    else:
        raise ConfigError(f"trace method {trace_method!r} is unknown: use hutchinson or fisher.")
    per_name = dict(zip(names, zip(est.mean, est.se)))
    trace = [sum(per_name[f"{m}.weight"][0] for m in u.members) for u in units]
    trace_se = [math.sqrt(sum(per_name[f"{m}.weight"][1] ** 2 for m in u.members)) for u in units]
    m_trace = [[per_name[f"{m}.weight"][0] for m in u.members] for u in units]
    m_trace_se = [[per_name[f"{m}.weight"][1] for m in u.members] for u in units]
    return est.probes, trace, trace_se, m_trace, m_trace_se


def _fp_frame_deltas(ref: Reference, units, candidates, weights: WeightCache, single_set, pair_bits, pair_window,
                     base, progress, memo: dict):
    """Measured loss increase of each unit alone at each width in ``single_set``, and of pairs at most
    ``pair_window`` layers apart at ``pair_bits``, in the fp model."""
    U, C = len(units), len(candidates)
    pc = next((c for c, cand in enumerate(candidates) if cand.bits == pair_bits), None)
    todo = [((k, c),) for k in range(U) for c, cand in enumerate(candidates) if cand.bits in single_set]
    if pc is not None:
        todo += [((a, pc), (b, pc)) for a in range(U) for b in range(a + 1, U)
                 if units[b].layer - units[a].layer <= pair_window]
    todo = [t for t in todo if all(kc in weights for kc in t)]  # a width that does not apply to a unit is skipped

    def swap_of(t):
        return lambda i: {m: w for kc in t if units[kc[0]].layer == i for m, w in weights[kc].items()}

    nll = variant_nlls(ref, [(min(units[k].layer for k, _ in t), swap_of(t)) for t in todo], progress=progress,
                       desc="loss deltas", **memo)
    single_all: list[list[float | None]] = [[None] * C for _ in range(U)]
    pairs = []
    for t, v in zip(todo, nll):
        if len(t) == 1:
            single_all[t[0][0]][t[0][1]] = v - base
        else:
            pairs.append((t[0][0], t[1][0], v - base))
    single = [row[pc] or 0.0 for row in single_all] if pc is not None else [0.0] * U
    return single, pairs, single_all


@torch.no_grad()
def measure_sensitivity(model, arch: Arch, windows: torch.Tensor, loss_windows: torch.Tensor,
                        candidates: list[Candidate], config: QuantConfig, device: torch.device, *,
                        model_name: str = "", granularity: str = "fused", trace_method: str = "hutchinson",
                        trace_tol: float = 0.05, max_probes: int = 16, pair_bits: int | None = 3,
                        pair_window: int = 1, batch_size: int = 8, seed: int = 0, progress: bool = True,
                        settings: dict | None = None, single_bits: tuple[int, ...] | None = None,
                        context_bits: int | None = None, context_method: str = "exact",
                        context_exact_bits: tuple[int, ...] = (16,),
                        context_anchor: list[str] | None = None, sequential: bool = False,
                        state: "LayerState | None" = None) -> Sensitivity:
    """Measure everything :meth:`Sensitivity.tables` needs. ``windows`` (n, seq) feed ``H_x`` and
    the candidate quantizations; ``loss_windows`` (m, seq), a smaller set run as one batch, feed
    the Hessian traces and the measured single/pair loss increases. ``single_bits`` (default: every
    candidate width) are the widths at which each unit's own loss increase is measured.
    ``context_bits``: also measure every unit at every candidate *in context*, with all other units
    at that width (its default-group candidate), for ``--objective context``. ``context_method``:
    ``exact`` runs one pass per (unit, candidate); ``taylor`` runs one pass per unit and width in
    ``context_exact_bits`` (16 = the fp weights) and predicts the rest from the gradient at the
    all-context model plus a per-unit curvature fitted to those passes (see :mod:`calibration.context`).
    ``context_anchor`` (a candidate label per unit) replaces the uniform ``context_bits`` model as the
    point the in-context changes are measured around. ``sequential`` (with an anchor): each decoder
    layer's candidates are quantized on the inputs of the anchor model, as `hmq quantize` builds it.
    Quantized candidate weights live in a cache folder on disk for the run, never in RAM as model copies.
    ``state`` (a :class:`quant.resume.LayerState` for these settings): each finished layer, the traces
    and each group of loss passes are saved there, and what an earlier start saved is taken back,
    so a rerun after a kill goes on from there and returns the same measurement."""
    t_all = time.perf_counter()
    secs: dict[str, float] = {}
    _check_options(config, candidates, context_method, trace_method, context_bits, pair_bits)
    units = build_units(model, arch, granularity)
    widths = sorted({c.bits for c in candidates if c.bits != 16})  # quantized candidate widths
    anchor = _context_anchor(units, candidates, context_bits, context_anchor)
    if sequential and anchor is None:
        raise ConfigError("sequential measurement quantizes each layer on the anchor model's inputs: give "
                          "context_bits or an anchor allocation with it.")
    cost = [[candidate_cost(u, c, config.partial_groups) for c in candidates] for u in units]
    overhead = overhead_bytes(model, units)
    single_set = set(single_bits if single_bits is not None else widths) | ({pair_bits} if pair_bits is not None else set())
    keep_bits = set(widths) if anchor is not None else single_set  # widths whose weights are cached

    # each process keeps every candidate (all of them receive every solve's rows) in its own folder
    part = f"-rank{dist.rank()}" if dist.world() > 1 else ""
    weights = WeightCache(state.folder / f"weights{part}" if state is not None else None)
    try:
        t0 = time.perf_counter()
        ref = Reference(model, arch, loss_windows, device)
        stats = _LayerErrors(model, arch, units, candidates, cost, config, weights, ref, keep_bits, anchor, sequential,
                             state)
        start = stats.restore() if state is not None else 0
        if start:
            log.info("resuming from %s: %d of %d decoder layers were already measured", state.folder, start, ref.layers)
        # with several processes each pushes its share of the windows; H_x is summed over all of them
        sweep(model, arch, dist.shard_batches(windows, batch_size), device, stats, batch_size=batch_size, keep=False,
              progress=progress, desc="measure layers", start=start,
              resume=lambda inputs: placed(state.streams()["hidden"], inputs))
        secs["layers"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        probes, trace, trace_se, m_trace, m_trace_se = _kept(
            state, "traces", lambda: _traces(model, arch, units, loss_windows, device, trace_method, trace_tol,
                                             max_probes, seed, progress))
        secs["trace"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        base = ref.nll()
        single, pairs, single_all = _fp_frame_deltas(ref, units, candidates, weights, single_set, pair_bits,
                                                     pair_window, base, progress, _memo(state, "loss passes"))
        context = context_single = context_dloss = context_exact = None
        if anchor is not None:
            from .context import measure_in_context

            context = candidates[anchor[0]].label if context_anchor is None else "mixed"
            context_single, context_dloss, context_exact = measure_in_context(
                model, arch, units, candidates, weights, anchor, loss_windows, device, base, progress, context_method,
                context_exact_bits, _memo(state, "in-context passes"))
        secs["loss_deltas"] = time.perf_counter() - t0
    finally:
        weights.close()
    secs["total"] = time.perf_counter() - t_all
    settings = dict(settings or {})
    settings.update({"method": config.method, "sym": config.sym, "partial_groups": config.partial_groups,
                     "damp_percent": config.damp_percent, "act_order": config.act_order, "clip": config.clip,
                     "clip_weighted": config.clip_weighted, "clip_both": config.clip_both,
                     "static_groups": config.static_groups, "group_params": config.group_params,
                     "granularity": granularity,
                     "trace_method": trace_method, "trace_probes": probes, "trace_tol": trace_tol,
                     "pair_bits": pair_bits, "pair_window": pair_window, "single_bits": sorted(single_set),
                     "loss_tokens": int(loss_windows.numel()), "context_bits": context_bits,
                     "context_method": context_method if anchor is not None else None,
                     "sequential": sequential,
                     "context_exact_bits": list(context_exact_bits) if context_method == "taylor" else None})
    return Sensitivity(model_name, fingerprint(model, units), settings, units, candidates, cost, stats.sqnorm,
                       stats.out_err, stats.hx_trace, trace, trace_se, base, single, pairs, int(overhead), secs,
                       m_trace, m_trace_se, stats.m_sqnorm, stats.m_out_err, single_all, context, context_single,
                       context_dloss, context_exact, list(context_anchor) if context_anchor is not None else None)


def _check_options(config: QuantConfig, candidates: list[Candidate], context_method: str, trace_method: str,
                   context_bits: int | None, pair_bits: int | None) -> None:
    """Refuse a measurement that cannot run, before any work."""
    if get_method(config.method).affine:
        raise ConfigError(f"measure with --method gptq or rtn, not {config.method}: affine transforms are learned per "
                          "block at quantize time, after the allocation (quantize with --method "
                          f"{config.method} and a --sensitivity measured with gptq).")
    widths = sorted({c.bits for c in candidates if c.bits != 16})
    if context_method not in ("exact", "taylor"):
        raise ConfigError(f"context method {context_method!r} is unknown: use exact or taylor.")
    if trace_method not in ("hutchinson", "fisher"):
        raise ConfigError(f"trace method {trace_method!r} is unknown: use hutchinson or fisher.")
    if context_bits is not None and context_bits not in widths:
        raise ConfigError(f"--context-bits {context_bits} must be one of the candidate widths {widths}.")
    if pair_bits is not None and pair_bits not in [c.bits for c in candidates]:
        raise ConfigError(f"--pair-bits {pair_bits} must be one of the candidate widths {[c.bits for c in candidates]}.")
