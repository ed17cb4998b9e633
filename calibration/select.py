"""The default mixed-precision recipe of ``hmq quantize --budget B``: choose each unit's width by the
KL divergence of the whole quantized model from the fp model, on selection text, in the spirit of
EvoPress (Sieberling et al. 2024), and ship exactly the model that was scored.

1. **Database** (:func:`calibration.search.candidate_database`): one layer sweep quantizes every
   unit at every candidate width with GPTQ, each layer on the inputs of the *anchor* model (the
   uniform scheme nearest the budget from above), true-sequential inside a layer as `quantize` is,
   keeping each candidate's codes. At the anchor the stitched model *is* uniform GPTQ.
2. **Scores** (:class:`calibration.search.KLScore`): the fp model's next-token distributions on the
   selection windows (top-k kept), from one more sweep; a configuration's score is the mean KL of
   the model stitched from the database.
3. **Start**: every uniform scheme that fits the budget and (unless the anchor itself fits) the
   integer program on the database's own relative output errors are scored on the search's first
   windows; the best is the start.
4. **Search** (:func:`quant.search.evolve`): (1 + λ) evolution with level-switch mutations under
   the budget; children are screened on a few of the search windows, the best scored on all
   (multi-step selection), and a child is kept only when lower than its parent (with ``pool``, off
   by default, each generation draws its windows afresh, as EvoPress draws fresh tokens, and
   scores the parent again on them). Last, the search's choice, the starts and every uniform
   scheme that fits are scored on confirmation windows drawn apart from the search's. The best
   uniform scheme there is the choice unless a mixed configuration is lower by more than
   ``margin`` standard errors of the per-window differences (:func:`final_pick`): never worse there
   than any uniform scheme that fits, by construction, and a gain inside the windows' noise keeps
   uniform.
5. **Assembly** (:func:`assemble`): the chosen candidates' codes become the checkpoint's modules: the
   model written is bit for bit the one whose KL was measured.
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch import nn

from quant import dist
from quant.allocate import Problem, solve
from quant.arch import Arch, decoder_layers, set_submodule
from quant.config import ConfigError, QuantConfig
from quant.engine import visit
from quant.pipeline import ModuleResult, QuantReport, fp16_bytes
from quant.qlinear import QuantLinear
from quant.quantizer import QuantizedWeight
from quant.search import evolve
from quant.stream import detach_store
from quant.variants import WeightCache

from .units import Candidate, Unit

log = logging.getLogger("hmq")


@dataclass
class SelectOptions:
    """The search's effort (``configs/{fast,default,thorough}.yaml`` set these)."""

    generations: int = 16
    offspring: int = 8
    survivors: int = 2
    samples: int = 8  # selection windows every finalist is scored on
    seqlen: int = 512
    screen: int = 2  # windows every child is screened on
    top_k: int = 128  # fp next-token probabilities kept per position
    confirm: int = 24  # more selection windows (apart from the pool) on which the search's choice, its starts and every
                       # uniform scheme that fits are scored last (final_pick chooses)
    pool: int = 0  # selection windows each generation draws its `samples` from afresh; ≤ samples: the same every time
    ladder: bool = False  # each width also per output channel and at half the group size: steps of ~0.3 bpw
    neighbours: int = 1  # candidates each side of the anchor (in price)
    # a mixed configuration replaces the best uniform scheme only when lower on the confirmation windows
    # by more than this many standard errors of its per-window KL differences (set a priori, not tuned:
    # about 98% one-sided); 0: any lower mean
    margin: float = 2.0

    @property
    def pool_size(self) -> int:
        """Selection windows the search draws from (the confirmation windows come after them)."""
        return max(self.pool, self.samples)

    def check(self) -> None:
        if min(self.generations, self.samples, self.seqlen, self.screen, self.top_k, self.survivors,
               self.neighbours) < 1 \
                or self.seqlen < 2 or self.confirm < 0 or self.pool < 0 or not self.margin >= 0 \
                or self.offspring < self.survivors or self.screen > self.samples:
            raise ConfigError("the selection search needs --search (generations), --search-samples, --search-seqlen, "
                              "--search-screen ≥ 1 with --search-screen ≤ --search-samples, --search-seqlen ≥ 2, --search-offspring ≥ 2, --search-pool ≥ 0 "
                              "and a margin ≥ 0.")


@dataclass
class Selection:
    choice: list[int]  # candidate index per unit
    labels: list[str]  # candidate label per unit
    bpw: float  # real bits per weight of the decoder linears
    kl: float  # selection KL of the chosen (stitched = shipped) model
    start: str  # what the search started from
    uniform: list[dict]  # each uniform scheme that fits: label, bpw, kl (on the same windows)
    search: dict
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self, unit_names: list[str]) -> dict:
        return {"recipe": "select", "bpw": self.bpw, "kl": self.kl, "start": self.start, "uniform": self.uniform,
                "search": self.search, "seconds": self.seconds, "units": dict(zip(unit_names, self.labels))}


def uniform_schemes(cost: np.ndarray, candidates: list[Candidate]) -> list[tuple[int, float]]:
    """(candidate, total cost) of every quantized candidate that every unit can take, cheapest first."""
    out = [(c, float(cost[:, c].sum())) for c, cand in enumerate(candidates)
           if cand.bits != 16 and np.isfinite(cost[:, c]).all()]
    return sorted(out, key=lambda t: t[1])


def ladder(widths: list[int], group_size: int, on: bool = True) -> list[str]:
    """Candidate labels for ``widths``: each at ``group_size``, and with ``on`` also per output channel
    and at half the group (from 64 up): on a 576-wide model 2.03, 2.28, 2.56, 3.03, 3.30, 3.59, 4.03 …
    bits per weight, steps a unit can take at a fraction of a width's price."""
    labels = [str(w) for w in widths]
    if on and group_size != -1:
        labels += [f"{w}g-1" for w in widths] + ([f"{w}g{group_size // 2}" for w in widths] if group_size >= 64 else [])
    return labels


def pick_widths(totals: dict, budget: float, neighbours: int = 1) -> list:
    """The candidates worth quantizing every unit at for ``budget`` (``totals``: candidate -> the bytes
    of the uniform model at it): the anchor (the cheapest whose uniform model is not below the budget)
    and ``neighbours`` on each side in price: a unit rarely profits from a longer jump."""
    keys = sorted(totals, key=lambda c: totals[c])
    above = [i for i, c in enumerate(keys) if totals[c] >= budget * (1 - 1e-9)]
    at = above[0] if above else len(keys) - 1
    return keys[max(0, at - neighbours) : at + neighbours + 1]


def anchor_of(uniform: list[tuple[int, float]], budget: float) -> int:
    """The uniform scheme nearest the budget from above (the database's inputs come from it): the
    model the search ends near; the widest one when the budget is above them all."""
    above = [c for c, total in uniform if total >= budget * (1 - 1e-9)]
    return above[0] if above else uniform[-1][0]


def calibrated_errors(errors: dict[tuple[int, int], float], cost: np.ndarray, anchor: int, probe: list[int],
                      base: float, single: list[float]) -> np.ndarray:
    """(units, candidates) predicted KL increase over the anchor model: each unit's relative output
    errors (``errors``) scaled by one measured point, the KL of the anchor with that unit alone at
    candidate ``probe[k]`` (``single[k]``; ``base``: the anchor's own KL), so
    ``D[k, c] = α_k (e[k, c] - e[k, anchor])`` with ``α_k`` from that point (never below zero: a
    unit whose narrowing did not measurably hurt costs nearly nothing). Keeping 16 bits: e = 0."""
    U, C = cost.shape
    D = np.full((U, C), np.inf)
    for k in range(U):
        e = [errors.get((k, c), 0.0) for c in range(C)]
        span = e[probe[k]] - e[anchor]
        alpha = max(single[k] - base, 0.0) / span if span > 0 else 0.0
        for c in range(C):
            if np.isfinite(cost[k, c]):
                D[k, c] = alpha * (e[c] - e[anchor])
    return D


def ilp_start(D: np.ndarray, cost: np.ndarray, budget: float, ties: list[tuple[int, int]]) -> list[int] | None:
    """The integer program's choice on the table ``D`` under ``budget``; None when nothing fits."""
    problem = Problem(D, np.where(np.isfinite(D), cost, np.inf), ties=list(ties))
    if problem.min_cost() > budget:
        return None
    return list(solve(problem, budget).choice)


def select(units: list[Unit], candidates: list[Candidate], cost: np.ndarray, budget: float, errors: dict, fitness, *,
           opts: SelectOptions, ties: list[tuple[int, int]] = (), seed: int = 0,
           progress: bool = True, checkpoint=None, resume: dict | None = None, confirm=None) -> Selection:
    """Steps 3 and 4 of the module docstring with ``fitness`` over a built database (a
    :class:`calibration.search.StitchedLoss` with a :class:`calibration.search.KLScore`, or a
    :class:`calibration.search.Redrawn` one, whose windows each generation draws afresh). ``confirm``
    (configurations -> their KL on other selection windows): the search's choice, its starts and every
    uniform scheme that fits are scored there last (so windows the search has seen cannot have
    overfitted it), and :func:`final_pick` chooses (with per-window values from ``confirm``, a mixed
    configuration must beat the best uniform one by ``opts.margin`` standard errors); without
    ``confirm``, on the search's windows."""
    t0 = time.perf_counter()
    U = len(units)
    allowed = np.isfinite(cost)
    uniform = [(c, total) for c, total in uniform_schemes(cost, candidates) if total <= budget * (1 + 1e-9)]
    if resume is None:
        anchor = anchor_of(uniform_schemes(cost, candidates), budget)
        starts = [(candidates[c].label, [c] * U) for c, _ in uniform if c != anchor]
        # the anchor first: the reference the single-unit passes share their front layers with
        scores = fitness.many([[anchor] * U] + [s for _, s in starts], True)
        base_full, scores = scores[0], scores[1:]
        if any(c == anchor for c, _ in uniform):
            # the budget is the anchor's own size: uniform is the start. The integer program's start (its
            # single-unit passes are most of the starts' time) scored worse there on every SmolLM2 run
            starts.insert(0, (candidates[anchor].label, [anchor] * U))
            scores.insert(0, base_full)
        else:
            D = _calibrated_table(units, candidates, cost, anchor, errors, fitness, ties)
            # one solve, on the first process, for all of them (under a time limit two need not agree)
            ilp = dist.gather_all(ilp_start(D, cost, budget, list(ties)) if dist.is_main() else None)[0]
            if ilp is not None:
                starts.append(("ILP on calibrated errors", ilp))
                scores.append(fitness.many([ilp], True)[0])
        if not starts:
            raise ConfigError("no configuration of the candidate widths fits this budget: raise it.")
        record = [{"label": label, "bpw": _bpw(cost, s, units), "kl": kl} for (label, s), kl in zip(starts, scores)]
        best = min(range(len(starts)), key=lambda j: scores[j])
        begin = {"label": starts[best][0], "choice": starts[best][1], "scored": record,
                 "choices": [s for _, s in starts], "seconds": time.perf_counter() - t0}
    else:
        begin = resume["begin"]
    log.info("selection starts: %s", ", ".join(f"{r['label']} KL {r['kl']:.4f}" for r in begin["scored"]))
    res = evolve(cost, budget, begin["choice"], fitness, generations=opts.generations, offspring=opts.offspring,
                 survivors=opts.survivors, ties=list(ties), allowed=allowed, seed=seed, progress=progress,
                 checkpoint=(lambda st: checkpoint({"begin": begin, "search": st})) if checkpoint else None,
                 resume=resume["search"] if resume else None, redraw=getattr(fitness, "draw", None))
    record = res.to_dict() | {"starts": begin["scored"]}
    t1 = time.perf_counter()
    # the last word: the search's choice beside its starts (every uniform scheme that fits among
    # them) on windows they share, the confirmation windows where there are any (final_pick chooses)
    final = [(r["label"], list(c)) for r, c in zip(begin["scored"], begin["choices"])] + [("search", list(res.choice))]
    if confirm is None and getattr(fitness, "draw", None) is None:  # all were scored on the same windows already
        kls, windows = [r["kl"] for r in begin["scored"]] + [res.score], "search"
    else:  # each distinct configuration once
        distinct = list({tuple(c): None for _, c in final})
        got = dict(zip(distinct, confirm([list(c) for c in distinct]) if confirm is not None
                       else fitness.many([list(c) for c in distinct], True)))
        kls, windows = [got[tuple(c)] for _, c in final], "confirmation" if confirm is not None else "search"
    each = [k if isinstance(k, (list, tuple)) else None for k in kls]  # per-window KLs, where the scorer gives them
    kls = [float(np.mean(k)) if e is not None else k for k, e in zip(kls, each)]
    pick, margins = final_pick(kls, each, [len(set(c)) == 1 for _, c in final], opts.margin)
    label, choice = final[pick]
    rows = [{"label": lab, "bpw": _bpw(cost, c, units), "kl": kl} | ({"margin": m} if m is not None else {})
            for (lab, c), kl, m in zip(final, kls, margins)]
    record["final"] = {"windows": windows, "scored": rows, "chosen": label, "margin": opts.margin}
    if label != "search":
        log.info("selection: %s is kept on the %s windows (KL %.4f; the search's choice %.4f)",
                 label, windows, kls[pick], kls[-1])
    uniform_rows = [r for r in rows[:-1] if not r["label"].startswith("ILP")]
    return Selection(choice, [candidates[c].label for c in choice], _bpw(cost, choice, units), kls[pick],
                     begin["label"], uniform_rows, record,
                     {"starts": begin["seconds"], "search": res.seconds, "confirm": time.perf_counter() - t1})


def paired_gain(base: list[float], other: list[float]) -> tuple[float, float, float]:
    """How much lower ``other`` is than ``base`` on the same windows (one value per window each): the
    mean of the per-window differences ``base - other`` (> 0: ``other`` is lower), its standard error,
    and their ratio (the gain in standard errors; ±1e9 when every window gains the same, 0 with no
    difference, NaN where a value is not finite). Needs at least two windows."""
    if len(base) != len(other) or len(base) < 2:
        raise ValueError(f"a paired comparison needs values on the same windows, at least 2: got {len(base)} "
                         f"and {len(other)}")
    d = np.asarray(base, dtype=float) - np.asarray(other, dtype=float)
    mean, se = float(d.mean()), float(d.std(ddof=1)) / math.sqrt(len(d))
    if not math.isfinite(mean):
        return mean, se, math.nan
    t = mean / se if se > 0 else math.copysign(1e9, mean) if mean != 0 else 0.0
    return mean, se, t


def final_pick(kls: list[float], each: list[list[float] | None], uniform: list[bool],
               margin: float) -> tuple[int, list[float | None]]:
    """The configuration to write, from each one's mean KL ``kls`` (the search's choice last) and, where
    known, its KL on each window (``each``): the best uniform one (``uniform``) unless a mixed one is
    lower by more than ``margin`` standard errors of its per-window differences from it (a paired
    test: a gain inside the windows' noise keeps uniform); among those that are, the lowest. Without
    per-window values, or with one window, or with no uniform one among them, the lowest. A tie goes
    to the search; a non-finite KL counts as infinite. Also each mixed one's gain over that uniform
    one in standard errors (None for uniform ones, where unknown and where not finite)."""
    last = len(kls) - 1
    key = [k if math.isfinite(k) else math.inf for k in kls]
    lowest = min(range(len(kls)), key=lambda j: (key[j], j != last))
    base = [j for j in range(len(kls)) if uniform[j]]
    margins: list[float | None] = [None] * len(kls)
    if not base or any(each[j] is None or len(each[j]) < 2 for j in range(len(kls))):
        return lowest, margins
    best = min(base, key=lambda j: (key[j], j != last))
    for j in range(len(kls)):
        if not uniform[j]:
            t = paired_gain(each[best], each[j])[2]
            margins[j] = t if math.isfinite(t) else None
    passed = [j for j in range(len(kls)) if margins[j] is not None and margins[j] > margin and key[j] < key[best]]
    if not passed:
        return best, margins
    return min(passed, key=lambda j: (key[j], j != last)), margins


def _calibrated_table(units, candidates, cost, anchor: int, errors: dict, fitness, ties) -> np.ndarray:
    """:func:`calibrated_errors` with its single-unit passes: each unit (each tie group together) at
    the narrowest candidate, the rest at the anchor, scored on the screening windows."""
    from quant.allocate import tie_groups

    U = len(units)
    narrow = uniform_schemes(cost, candidates)[0][0]  # the cheapest
    groups = tie_groups(U, list(ties))
    probes = []
    for g in groups:
        choice = [anchor] * U
        for k in g:
            choice[k] = narrow if np.isfinite(cost[k, narrow]) else anchor
        probes.append(choice)
    base = fitness.many([[anchor] * U], False)[0]
    got = fitness.many(probes, False)
    single = [0.0] * U
    for g, kl in zip(groups, got):
        for k in g:  # a tie group's damage split by its units' errors
            share = errors.get((k, narrow), 0.0) / max(sum(errors.get((j, narrow), 0.0) for j in g), 1e-30)
            single[k] = base + (kl - base) * share
    return calibrated_errors(errors, cost, anchor, [narrow] * U, base, single)


def _bpw(cost: np.ndarray, choice: list[int], units: list[Unit]) -> float:
    return 8 * float(sum(cost[k, c] for k, c in enumerate(choice))) / sum(u.params for u in units)


def selection_config(units: list[Unit], candidates: list[Candidate], choice: list[int], base: QuantConfig) -> QuantConfig:
    """``base`` with one exact-name override per linear carrying its unit's chosen width and group."""
    import dataclasses

    overrides = dict(base.overrides)
    for u, c in zip(units, choice):
        for m in u.members:
            overrides[f"^{re.escape(m)}$"] = {"bits": candidates[c].bits, "group_size": candidates[c].group_size}
    return dataclasses.replace(base, overrides=overrides)


@torch.no_grad()
def assemble(model: nn.Module, arch: Arch, units: list[Unit], candidates: list[Candidate], choice: list[int],
             codes: WeightCache, config: QuantConfig, progress: bool = True) -> QuantReport:
    """Put each unit's chosen codes into ``model`` as :class:`quant.qlinear.QuantLinear` modules (a
    keep-16 unit keeps its weights), layer by layer, and return the report `quantize` gives."""
    t0 = time.perf_counter()
    report = QuantReport()
    by_member = {m: (k, u) for k, u in enumerate(units) for m in u.members}
    for i, layer in visit(model, arch, range(len(decoder_layers(model, arch))), torch.device("cpu"), keep=True,
                          progress=progress, desc="assemble"):
        prefix = f"{arch.layers}.{i}."
        for name in arch.at(layer).linears:
            full = prefix + name
            linear = layer.get_submodule(name)
            k, u = by_member[full]
            cand = candidates[choice[k]]
            if cand.bits == 16:
                report.modules.append(ModuleResult(full, 16, -1, linear.weight.numel(), fp16_bytes(linear), 0.0))
                continue
            got = codes[(k, choice[k])]
            qw = QuantizedWeight(got[f"{full}.intweight"], got[f"{full}.scales"], got[f"{full}.zeros"],
                                 got[f"{full}.g_idx"], cand.bits, cand.group_size, config.sym)
            q = QuantLinear.from_quantized(qw, linear.bias, dtype=linear.weight.dtype)
            set_submodule(layer, name, q)
            report.modules.append(ModuleResult(full, cand.bits, cand.group_size, linear.weight.numel(),
                                               q.storage_bytes, 0.0))
    detach_store(model)
    report.seconds = time.perf_counter() - t0
    return report


@dataclass
class SelectRun:
    """What :func:`select_model` needs beyond the model: the budget (one of the two), the widths and
    units measured, the engine's ties, and where its progress is saved."""

    bpw: float | None
    gb: float | None
    widths: str = "2,3,4,8"
    keep: bool = True
    granularity: str = "fused"
    ties_for_experts: bool = False
    folder: str | None = None  # a resume folder: the database's layers and the search's generations
    settings: dict = field(default_factory=dict)  # what identifies the run (a rerun with others starts afresh)
    restart: bool = False


def select_model(model: nn.Module, arch: Arch, config: QuantConfig, windows: torch.Tensor, select_windows: torch.Tensor,
                 device: torch.device, run: SelectRun, opts: SelectOptions, *, seed: int = 0, batch_size: int = 8,
                 progress: bool = True) -> tuple[QuantReport, QuantConfig, dict]:
    """The whole recipe (module docstring) on ``model``, quantized in place: returns its report, the
    per-module config it was quantized with and the allocation record (the selection KL of the
    written model, re-measured on it, beside the uniform schemes')."""
    from quant.resume import LayerState

    from .mixed import budget_bytes, expert_ties
    from .search import candidate_database
    from .units import build_units, candidate_cost, overhead_bytes, parse_candidates

    opts.check()
    if len(select_windows) != opts.pool_size + opts.confirm:
        raise ValueError(f"{len(select_windows)} selection windows; these options take {opts.pool_size + opts.confirm} "
                         "(selection_windows makes them)")
    units = build_units(model, arch, run.granularity)
    widths = sorted({int(w) for w in run.widths.split(",")})
    every = parse_candidates(ladder(widths, config.group_size, opts.ladder), config.group_size, False)
    cost_all = np.array([[candidate_cost(u, c, config.partial_groups) for c in every] for u in units])
    budget = budget_bytes(sum(u.params for u in units), overhead_bytes(model, units), run.bpw, run.gb)
    totals = {c: total for c, total in uniform_schemes(cost_all, every)}
    if not totals:
        raise ConfigError(f"no candidate width ({run.widths}) at group size {config.group_size} fits every linear of "
                          "this model: pass --group-size that divides them.")
    narrowest = min(totals, key=lambda c: totals[c])
    if budget < totals[narrowest] * (1 - 1e-9):
        need = math.ceil(8000 * totals[narrowest] / sum(u.params for u in units)) / 1000
        raise ConfigError(f"the budget is below the smallest model of these widths ({every[narrowest].label} everywhere, "
                          f"{need:.3f} bits per weight): raise it to at least --budget {need:.3f}.")
    chosen = [every[c] for c in pick_widths(totals, budget, opts.neighbours)]
    candidates = parse_candidates([f"{c.bits}g{c.group_size}" for c in chosen], config.group_size, run.keep)
    cost = np.array([[candidate_cost(u, c, config.partial_groups) for c in candidates] for u in units])
    anchor = anchor_of(uniform_schemes(cost, candidates), budget)
    ties = expert_ties(units) if run.ties_for_experts else []
    log.info("selection: candidates %s around %.3f bpw, database on the inputs of uniform %s",
             " ".join(c.label for c in candidates), 8 * budget / sum(u.params for u in units), candidates[anchor].label)
    # the margin only weighs the last step's scores (never saved): a rerun with another one goes on
    options = {k: v for k, v in vars(opts).items() if k != "margin"}
    settings = {**run.settings, "candidates": [c.label for c in candidates], "anchor": anchor, "options": options,
                "budget": budget}
    state = LayerState(run.folder, settings, run.restart, "selection") if run.folder else None
    part = f"-rank{dist.rank()}" if dist.world() > 1 else ""  # every process keeps every candidate's codes
    codes = WeightCache(state.folder / f"codes{part}" if state is not None else None)
    errors: dict = {}
    secs = {}
    t0 = time.perf_counter()
    db = candidate_database(model, arch, units, candidates, cost.tolist(), windows, config, device,
                            [anchor] * len(units), batch_size=batch_size, progress=progress, state=state, codes=codes,
                            errors=errors)
    try:
        secs["database"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fitness, confirm, final = _scores(model, arch, units, db, select_windows, device, opts, seed)
        secs["fp_reference"] = time.perf_counter() - t0
        sel = select(units, candidates, cost, budget, errors, fitness, opts=opts, ties=ties, seed=seed,
                     progress=progress, checkpoint=(lambda st: state.record("select", st)) if state else None,
                     resume=state.extra.get("select") if state else None, confirm=confirm)
        secs.update(sel.seconds)
        t0 = time.perf_counter()
        report = assemble(model, arch, units, candidates, sel.choice, codes, config, progress)
        secs["assemble"] = time.perf_counter() - t0
    finally:
        db.close()
        codes.close()
    t0 = time.perf_counter()
    final_windows, final_score = final()  # where the choice was made
    measured = written_kl(model, arch, final_windows, device, final_score)
    secs["check"] = time.perf_counter() - t0
    record = sel.to_dict([u.name for u in units]) | {"measured_kl": measured, "seconds": secs}
    report.seconds = sum(secs.values())
    if state is not None:
        state.finish()
    return report, selection_config(units, candidates, sel.choice, config), record


POOL_SEED = 7919  # the rest of the selection pool is drawn with the run's seed plus this


def _scores(model: nn.Module, arch: Arch, units: list[Unit], db: WeightCache, select_windows: torch.Tensor,
            device: torch.device, opts: SelectOptions, seed: int):
    """The search's fitness (on windows drawn afresh from the pool when it is larger than
    ``samples``), the confirmation scorer (None without confirmation windows) and a function giving
    the windows and score the last choice was made on, from ``select_windows`` laid out as
    :func:`selection_windows` makes them: the first draw, the confirmation windows, the rest of the pool."""
    from .search import KLScore, Redrawn, StitchedLoss

    n, c = opts.samples, len(select_windows) - opts.pool_size
    search_windows = torch.cat([select_windows[:n], select_windows[n + c:]])
    confirm_windows = select_windows[n : n + c]
    score = KLScore(model, arch, search_windows, device, opts.top_k)
    if len(search_windows) > opts.samples:
        fitness = Redrawn(model, arch, units, db, search_windows, device, opts.samples, opts.screen, score, seed)
    else:
        fitness = StitchedLoss(model, arch, units, db, search_windows, device, opts.screen, score=score)
    if not len(confirm_windows):
        return fitness, None, lambda: (getattr(fitness, "windows", search_windows), fitness.score)
    final_score = KLScore(model, arch, confirm_windows, device, opts.top_k)
    # screening on all its windows: each configuration from the first layer, no boundary kept
    confirm = partial(StitchedLoss(model, arch, units, db, confirm_windows, device, len(confirm_windows),
                                   score=final_score.each()).many, full=False)
    return fitness, confirm, lambda: (confirm_windows, final_score)


def selection_windows(tokenizer, source: str | None, opts: SelectOptions, seed: int) -> torch.Tensor:
    """The selection windows :func:`select_model` takes (``opts.seqlen`` tokens each, from the
    selection part of ``source``): the search's first ``samples`` and the ``confirm`` windows, as one
    draw (the same windows whatever the pool), then the rest of the pool from a second draw."""
    from .data import calibration_windows

    first = calibration_windows(tokenizer, source, opts.samples + opts.confirm, opts.seqlen, seed, "select")
    more = opts.pool_size - opts.samples
    if more == 0:
        return first
    return torch.cat([first, calibration_windows(tokenizer, source, more, opts.seqlen, seed + POOL_SEED, "select")])


@torch.no_grad()
def written_kl(model: nn.Module, arch: Arch, windows: torch.Tensor, device: torch.device, score) -> float:
    """The selection KL of ``model`` as it now is (its quantized modules), in one more sweep."""
    from quant.engine import head_on

    from .search import last_boundary

    last = last_boundary(model, arch, windows, device)
    with head_on(model, arch, device):
        return score(last, len(windows))
