"""Mixed precision plumbing: measured sensitivity -> allocation problem -> per-module QuantConfig,
plus budgets in the units users think in (bits per weight, bytes) and the frontier report."""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass

import numpy as np

from quant.allocate import BudgetError, Problem, Solution, frontier, solve
from quant.config import QuantConfig
from quant.moe import expert_block

from .sensitivity import CONTEXT_GAIN_SCALE, Sensitivity

log = logging.getLogger("hmq")


@dataclass
class Allocation:
    budget: float  # in the problem's cost unit: bytes, or the latency table's unit
    solution: Solution
    candidates: list[str]  # label per unit
    bits: list[int]  # per unit
    predicted_dloss: float  # predicted mean-NLL increase
    bpw: float  # real bits per weight of the decoder linears (codes + scales + zeros)
    unit_names: list[str]

    def to_dict(self) -> dict:
        s = self.solution
        return {"bpw": self.bpw, "cost": s.cost, "budget": self.budget,
                "predicted_dloss": self.predicted_dloss, "status": s.status, "gap": s.gap, "solve_seconds": s.seconds,
                "units": dict(zip(self.unit_names, self.candidates))}


def total_params(sens: Sensitivity) -> int:
    return sum(u.params for u in sens.units)


def budget_to_bytes(sens: Sensitivity, bpw: float | None = None, gb: float | None = None) -> float:
    """``bpw``: average bits per weight of the decoder linears (scales and zeros included).
    ``gb``: the whole checkpoint in 10⁹ bytes; embeddings, norms and lm_head count at 16 bits."""
    return budget_bytes(total_params(sens), sens.overhead_bytes, bpw, gb)


def budget_bytes(params: int, overhead: float, bpw: float | None = None, gb: float | None = None) -> float:
    """Bytes of the decoder linears (``params`` weights) under ``bpw`` or ``gb`` (the whole checkpoint,
    ``overhead``: the bytes of what stays in 16 bits)."""
    if (bpw is None) == (gb is None):
        raise BudgetError("give exactly one budget: --budget BITS_PER_WEIGHT or --budget-gb GB.")
    if bpw is not None:
        if not bpw > 0:
            raise BudgetError(f"--budget {bpw} must be a positive number of bits per weight, e.g. 3.0.")
        return bpw * params / 8
    rest = gb * 1e9 - overhead
    if rest <= 0:
        raise BudgetError(f"--budget-gb {gb} does not even hold the unquantized embeddings, norms and lm_head "
                          f"({overhead / 1e9:.3f} GB).")
    return rest


def shape_key(unit) -> str:
    return f"{unit.out_features}x{unit.in_features}"


def latency_costs(sens: Sensitivity, table: dict) -> np.ndarray:
    """(units, candidates) latency from a table ``{"OUTxIN": {"w4g128": t, ..., "fp16": t}}`` (as written by
    ``bench/latency_table.py``); a candidate the table lacks for a shape is not allowed there."""
    cost = np.full((len(sens.units), len(sens.candidates)), np.inf)
    missing = sorted({shape_key(u) for u in sens.units} - set(table))
    if missing:
        raise BudgetError(f"the latency table has no entry for unit shape(s) {', '.join(missing)} (OUTxIN): "
                          "re-run bench/latency_table.py for this model.")
    for k, u in enumerate(sens.units):
        row = table[shape_key(u)]
        for c, cand in enumerate(sens.candidates):
            if cand.label in row and np.isfinite(sens.cost[k][c]):
                cost[k, c] = float(row[cand.label])
    return cost


def expert_ties(units) -> list[tuple[int, int]]:
    """Units that must take one candidate because the engine runs them as one module: every expert
    unit of one MoE block (vLLM's fused-MoE layers hold one scheme for all their experts)."""
    blocks: dict[tuple[int, str], list[int]] = {}
    for k, u in enumerate(units):
        block = expert_block(u.kind)
        if block:
            blocks.setdefault((u.layer, block), []).append(k)
    return [(g[0], k) for g in blocks.values() for k in g[1:]]


def make_problem(sens: Sensitivity, objective: str = "hessian", pairs: bool = True,
                 latency: dict | None = None, gain_scale: float = CONTEXT_GAIN_SCALE,
                 ties: list[tuple[int, int]] | tuple = ()) -> Problem:
    D, P = sens.tables(objective, pairs, gain_scale)
    cost = latency_costs(sens, latency) if latency is not None else np.asarray(sens.cost, dtype=float)
    return Problem(D, cost, P, ties=list(ties), offset=sens.offset(objective))


def allocate(sens: Sensitivity, budget_bytes: float, objective: str = "hessian", pairs: bool = True,
             problem: Problem | None = None, gain_scale: float = CONTEXT_GAIN_SCALE,
             ties: list[tuple[int, int]] | tuple = ()) -> Allocation:
    """The ILP's allocation of ``sens``'s units under ``budget_bytes``; ``ties``: pairs of units that
    must share a candidate (:func:`expert_ties`)."""
    problem = problem or make_problem(sens, objective, pairs, gain_scale=gain_scale, ties=ties)
    n = total_params(sens)
    floor = problem.min_cost()
    if budget_bytes < floor - 1e-9:
        need = math.ceil(8000 * floor / n) / 1000
        raise BudgetError(
            f"a budget of {8 * budget_bytes / n:.3f} bits per weight ({(budget_bytes + sens.overhead_bytes) / 1e9:.4f} GB) "
            f"is below the smallest configuration hmq can build, with every unit at its narrowest candidate: "
            f"raise the budget to at least {need:.3f} bits per weight (--budget {need:.3f}) or "
            f"{(floor + sens.overhead_bytes) / 1e9:.4f} GB for the whole checkpoint."
        )
    sol = solve(problem, budget_bytes)
    return allocation_of(sens, sol, budget_bytes)


def allocate_latency(sens: Sensitivity, table: dict, budget: float, objective: str = "hessian",
                     pairs: bool = True, gain_scale: float = CONTEXT_GAIN_SCALE,
                     ties: list[tuple[int, int]] | tuple = ()) -> Allocation:
    """Like :func:`allocate`, with the summed per-unit latency of ``table`` as the budgeted cost."""
    problem = make_problem(sens, objective, pairs, table, gain_scale, ties)
    floor = problem.min_cost()
    if not budget >= floor - 1e-12:
        raise BudgetError(f"a latency budget of {budget:g} is below the fastest configuration the table allows, "
                          f"{floor:g} (same unit as the table): raise it to at least that.")
    return allocation_of(sens, solve(problem, budget), budget)


def allocation_of(sens: Sensitivity, sol: Solution, budget: float) -> Allocation:
    """The allocation a solver's ``sol`` makes of ``sens``'s units under ``budget``."""
    cands = [sens.candidates[c] for c in sol.choice]
    nbytes = sum(sens.cost[k][c] for k, c in enumerate(sol.choice))
    return Allocation(budget, sol, [c.label for c in cands], [c.bits for c in cands], sol.objective,
                      8 * nbytes / total_params(sens), [u.name for u in sens.units])


def frontier_allocations(sens: Sensitivity, bpws, objective: str = "hessian", pairs: bool = True,
                         gain_scale: float = CONTEXT_GAIN_SCALE) -> list[Allocation]:
    problem = make_problem(sens, objective, pairs, gain_scale=gain_scale)
    n = total_params(sens)
    sols = frontier(problem, [b * n / 8 for b in bpws])
    return [allocation_of(sens, s, s.cost) for s in sols]


def min_max_bpw(sens: Sensitivity, keep: bool = False) -> tuple[float, float]:
    cost = np.asarray(sens.cost, dtype=float)
    usable = [c for c, cand in enumerate(sens.candidates) if keep or cand.bits != 16]
    sub = cost[:, usable]
    finite = np.where(np.isfinite(sub), sub, -np.inf)
    n = total_params(sens)
    return 8 * float(sub.min(axis=1).sum()) / n, 8 * float(finite.max(axis=1).sum()) / n


def config_for(sens: Sensitivity, alloc: Allocation, base: QuantConfig) -> QuantConfig:
    """``base`` with one exact-name override per linear carrying its unit's bits and group size."""
    overrides = dict(base.overrides)
    for unit, cand in zip(sens.units, (sens.candidates[c] for c in alloc.solution.choice)):
        for m in unit.members:
            overrides[f"^{re.escape(m)}$"] = {"bits": cand.bits, "group_size": cand.group_size}
    return dataclasses.replace(base, overrides=overrides)


def base_config(sens: Sensitivity, config: QuantConfig | None = None) -> QuantConfig:
    """``config`` (default: the measurement's method, group size, sym, damping and solver settings) with the grouping
    and fusing the measurement assumed, so the quantized checkpoint matches the allocated units."""
    s = sens.settings
    if config is None:
        config = QuantConfig(method=s.get("method", "gptq"), group_size=s.get("group_size", 128),
                             sym=s.get("sym", False), damp_percent=s.get("damp_percent", 0.01),
                             **sens.solver)
    return dataclasses.replace(config, partial_groups=s.get("partial_groups", config.partial_groups),
                               unfused=s.get("granularity") == "linear")


def predicted_ppl(fp_ppl: float, dloss: float) -> float:
    return fp_ppl * math.exp(dloss)


def bit_map(sens: Sensitivity, alloc: Allocation) -> tuple[list[str], np.ndarray]:
    """(unit kinds, (layers, kinds) array of bits) for a heat map."""
    kinds = list(dict.fromkeys(u.kind for u in sens.units))
    layers = max(u.layer for u in sens.units) + 1
    grid = np.full((layers, len(kinds)), np.nan)
    for u, b in zip(sens.units, alloc.bits):
        grid[u.layer, kinds.index(u.kind)] = b
    return kinds, grid


def plot_frontier(path, predicted: list[dict], verified: list[dict], uniform: list[dict], fp_ppl: float,
                  sens: Sensitivity, heat: Allocation | None, title: str = "") -> None:
    """PNG: perplexity vs bits per weight (predicted frontier, measured mixed points, uniform RTN and
    GPTQ) and, beside it, the bit map of one mixed configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hm) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    if predicted:
        ax.plot([p["bpw"] for p in predicted], [p["predicted_ppl"] for p in predicted], "-", color="tab:blue",
                alpha=0.6, label="hmq mixed, predicted")
    if verified:
        ax.plot([p["bpw"] for p in verified], [p["ppl"] for p in verified], "o", color="tab:blue",
                label="hmq mixed, measured")
    for method, style in (("rtn", "s--"), ("gptq", "^--")):
        pts = sorted((p for p in uniform if p["method"] == method), key=lambda p: p["bpw"])
        if pts:
            ax.plot([p["bpw"] for p in pts], [p["ppl"] for p in pts], style, label=f"uniform {method.upper()}")
    ax.axhline(fp_ppl, color="gray", lw=1, ls=":", label=f"fp ({fp_ppl:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (codes + scales + zeros)")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_title(title or "perplexity vs size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if heat is not None:
        kinds, grid = bit_map(sens, heat)
        im = hm.imshow(grid.T, aspect="auto", cmap="viridis", vmin=2, vmax=16, interpolation="nearest")
        hm.set_yticks(range(len(kinds)), kinds, fontsize=7)
        hm.set_xlabel("decoder layer")
        hm.set_title(f"bits per unit at {heat.bpw:.2f} bpw")
        fig.colorbar(im, ax=hm, ticks=[2, 3, 4, 8, 16])
    else:
        hm.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def quantize_and_eval(load, windows, config: QuantConfig, device, eval_ids, seqlen: int = 512,
                      max_windows: int | None = 8, batch_size: int = 8, progress: bool = False):
    """Fresh model from ``load()`` -> quantize with ``config`` -> perplexity on ``eval_ids``.
    Returns (ppl, QuantReport, model, tokenizer)."""
    from quant.evaluate import perplexity
    from quant.pipeline import quantize_model

    model, tokenizer, arch = load()
    report = quantize_model(model, arch, windows, config, device, batch_size, progress=progress)
    res = perplexity(model, eval_ids, seqlen, max_windows, device, progress=False)
    return res["ppl"], report, model, tokenizer


def search_allocation(sens: Sensitivity, alloc: Allocation, model, arch, windows, loss_windows, config: QuantConfig,
                      device, generations: int, offspring: int = 8, survivors: int = 2, screen: int = 1,
                      seed: int = 0, progress: bool = True, latency: dict | None = None,
                      problem: Problem | None = None, state=None, batch_size: int = 8) -> tuple[Allocation, dict]:
    """Refine the ILP's ``alloc`` by evolutionary search (:func:`quant.search.evolve`) on the measured
    loss of ``loss_windows`` (n, seq), with every candidate quantized once on the inputs of the ILP's
    model (:func:`calibration.search.candidate_database`). Same budget and cost as ``alloc``; keeping
    16 bits stays out unless the ILP chose it; ``problem`` (the ILP's) gives the new allocation's
    predicted ΔNLL. Returns the new allocation and the search's record (losses, evaluations, time).
    ``state`` (a :class:`quant.resume.LayerState`): the database's layers and each generation are
    saved there, and a rerun goes on from what an earlier start saved."""
    from .search import StitchedLoss, candidate_database

    from quant.search import evolve

    cost = latency_costs(sens, latency) if latency is not None else np.asarray(sens.cost, dtype=float)
    start = list(alloc.solution.choice)
    allowed = np.array([[cand.bits != 16 or start[k] == c for c, cand in enumerate(sens.candidates)]
                        for k in range(len(sens.units))])
    db = candidate_database(model, arch, sens.units, sens.candidates, sens.cost, windows, config, device, start,
                            batch_size=batch_size, progress=progress, state=state)
    try:
        fitness = StitchedLoss(model, arch, sens.units, db, loss_windows, device, screen)
        saved = state.extra.get("search") if state is not None else None
        if saved is not None:
            log.info("resuming the search from %s: %d of %d generations were done", state.folder,
                     saved["generation"], generations)
        res = evolve(cost, alloc.budget, start, fitness, generations=generations, offspring=offspring,
                     survivors=survivors, seed=seed, progress=progress, allowed=allowed, resume=saved,
                     ties=problem.ties if problem is not None else None,
                     checkpoint=(lambda st: state.record("search", st)) if state is not None else None)
    finally:
        db.close()
    predicted = problem.objective(res.choice) if problem is not None else math.nan
    sol = Solution(res.choice, predicted, res.cost, f"searched ({alloc.solution.status} start)",
                   alloc.solution.gap, alloc.solution.seconds + res.seconds)
    return allocation_of(sens, sol, alloc.budget), res.to_dict()


def as_measured(config: QuantConfig, measured: dict[str, bool], explicit: set[str]) -> QuantConfig:
    """The solver settings a measurement was taken with, unless the user set them (then warn on a mismatch)."""
    for key, value in measured.items():
        flag = "--" + key.replace("_", "-")
        if key not in explicit:
            config = dataclasses.replace(config, **{key: value})  # as measured
        elif key == "group_params" and config.group_params != value:
            log.warning("the sensitivity was measured with --group-params %s but this run quantizes with %s: the "
                        "predicted damage may not match", value, config.group_params)
        elif getattr(config, key) != value:
            log.warning("the sensitivity was measured %s %s but this run quantizes %s it: the predicted damage may not "
                        "match (pass %s, or re-measure)", "with" if value else "without", flag,
                        "with" if getattr(config, key) else "without", flag if value else flag.replace("--", "--no-"))
    return config
