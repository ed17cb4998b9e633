"""Evolutionary refinement of a bit allocation against a measured loss (EvoPress, Sieberling et al.
2024, §3: "level-switch" mutations that stay within the budget, (1 + λ) selection with elitism,
offspring screened on few tokens and only the best few scored on all of them).

The integer program in :mod:`quant.allocate` is exact for the table it is given, but the table adds
up per-unit damages measured one at a time; at low budgets many narrow units together do more
damage than their sum. The search here asks the model itself: ``fitness(choice, full)`` is the
loss of the model built from ``choice`` (one candidate index per unit), on a small screening set
when ``full`` is false and on the whole selection set when true. It starts from the ILP's choice
and only ever accepts a configuration whose full-set loss is lower than its parent's on the same
windows, so on a fixed set it never ends worse than it started; with windows drawn afresh each
generation (``redraw``) the caller compares the end with the start on windows of its own.

A pure function on plain data: the caller decides what a configuration's loss is.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from .allocate import BudgetError, tie_groups


@dataclass
class SearchResult:
    choice: list[int]  # candidate index per unit
    cost: float
    score: float  # full-set loss of ``choice`` (with redraws: on the last set of windows)
    start_score: float  # full-set loss of the starting choice (with redraws: on the first set)
    evaluations: dict[str, int]  # fitness calls: {"screen": n, "full": n}
    seconds: float
    history: list[dict] = field(default_factory=list)  # one row per accepted improvement

    def to_dict(self) -> dict:
        return {"score": self.score, "start_score": self.start_score, "cost": self.cost,
                "evaluations": self.evaluations, "seconds": self.seconds, "history": self.history}


class _Levels:
    """Each tie group's usable candidates, cheapest first, and the group's cost at each."""

    def __init__(self, cost: np.ndarray, groups: list[list[int]], allowed: np.ndarray):
        self.cands: list[list[int]] = []
        self.costs: list[np.ndarray] = []
        for g in groups:
            ok = [c for c in range(cost.shape[1]) if all(allowed[u, c] and math.isfinite(cost[u, c]) for u in g)]
            ok.sort(key=lambda c: (float(cost[g, c].sum()), c))
            self.cands.append(ok)
            self.costs.append(np.array([float(cost[g, c].sum()) for c in ok]))
        self.groups, self.units = groups, cost.shape[0]

    def choice(self, lev: list[int]) -> list[int]:
        """Candidate index per unit of the levels ``lev`` (one per tie group)."""
        out = [0] * self.units
        for gi, g in enumerate(self.groups):
            for u in g:
                out[u] = self.cands[gi][lev[gi]]
        return out

    def total(self, lev: list[int]) -> float:
        return float(sum(self.costs[gi][lev[gi]] for gi in range(len(self.groups))))

    def levels(self, start: list[int]) -> list[int]:
        """A candidate per unit -> each tie group's level; refused where a group's units differ or its
        candidate is not allowed."""
        level = []
        for gi, g in enumerate(self.groups):
            c = start[g[0]]
            if any(start[u] != c for u in g) or c not in self.cands[gi]:
                raise ValueError(f"start gives unit {g[0]} candidate {c}, which is not allowed for its tie group {g}.")
            level.append(self.cands[gi].index(c))
        return level

    def children(self, lev: list[int], n: int, most: int, budget: float, rng: np.random.Generator,
                 seen: set) -> list[list[int]]:
        """Up to ``n`` mutants of ``lev`` not in ``seen`` (8n tries), each added to ``seen``."""
        kids = []
        for _ in range(n * 8):
            k = self.mutate(lev, most, budget, rng)
            if tuple(k) not in seen:
                seen.add(tuple(k))
                kids.append(k)
            if len(kids) == n:
                break
        return kids

    def mutate(self, lev: list[int], most: int, budget: float, rng: np.random.Generator) -> list[int]:
        """1..``most`` level switches of ``lev`` that end within ``budget`` (see :func:`evolve`)."""
        lev, n = list(lev), len(self.groups)
        for _ in range(int(rng.integers(1, most + 1))):
            a = int(rng.integers(n))
            up = bool(rng.integers(2))
            if up and lev[a] + 1 < len(self.cands[a]):
                lev[a] += 1
            elif lev[a] > 0:
                lev[a] -= 1
            spent = self.total(lev)
            while spent > budget:  # step random other groups down until the budget holds
                down = [g for g in range(n) if g != a and lev[g] > 0]
                if not down:
                    lev[a] -= 1  # nothing else can give: undo (the start was feasible, so this ends)
                else:
                    lev[down[int(rng.integers(len(down)))]] -= 1
                spent = self.total(lev)
            for g in rng.permutation(n):  # spend the slack, one level per group at most
                g = int(g)
                if g != a and lev[g] + 1 < len(self.cands[g]):
                    step = self.costs[g][lev[g] + 1] - self.costs[g][lev[g]]
                    if spent + step <= budget:
                        lev[g] += 1
                        spent += step
        return lev


def _restore(fitness, redraw, best: list[int], done: int, generations: int) -> None:
    """A resumed search's fitness as the uninterrupted one left it after ``done`` generations: on the
    windows of that generation, with the best so far as its reference (unless the next generation's
    redraw scores it again)."""
    if redraw is not None and done >= 2:
        redraw(done - 1)
    if redraw is None or done == 0 or done == generations:
        fitness(best, True)


def evolve(cost: np.ndarray, budget: float, start: list[int], fitness: Callable[[list[int], bool], float], *,
           generations: int = 50, offspring: int = 8, survivors: int = 2, max_mutations: int = 3,
           ties: list[tuple[int, int]] | None = None, allowed: np.ndarray | None = None, seed: int = 0,
           progress: bool = True, checkpoint: Callable[[dict], None] | None = None,
           resume: dict | None = None, redraw: Callable[[int], None] | None = None) -> SearchResult:
    """Refine ``start`` (candidate index per unit, within ``budget``) by (1 + λ) evolution.

    Each generation makes ``offspring`` children of the current best, each by 1..``max_mutations``
    level switches (one more allowed for every 10 generations without an improvement): one group
    moves one level up or down in cost, other random groups step down until the budget holds again, and any slack left is spent raising random groups one level
    where it fits. All children are screened (``fitness(child, False)``); the ``survivors`` best are
    scored on the full set (``fitness(child, True)``), and the best of those replaces the parent if
    it is lower (a fitness with a ``many(children, full)`` method scores each set in one call, with
    the same values). ``allowed`` (units, candidates) bool masks candidates out (e.g. keeping 16 bits);
    ``ties`` are units that always share one candidate. ``redraw(d)``: the fitness moves to its
    ``d``-th set of windows (EvoPress draws fresh tokens for every selection, so that no fixed few
    can be overfitted); generation ``g`` then uses set ``g - 1``, the parent is scored again on it
    (a full call) and a child replaces it only when lower on the same windows. ``checkpoint``
    receives the search's whole state (plain data) after every generation; ``resume`` (such a state)
    goes on from there (the fitness back on the windows of the saved generation, and its reference
    restored by a full call where no redraw will score the parent again), and ends as the
    uninterrupted search would, the fitness on the same windows."""
    t0 = time.perf_counter()
    cost = np.asarray(cost, dtype=float)
    U, C = cost.shape
    allowed = np.ones((U, C), bool) if allowed is None else np.asarray(allowed, bool)
    if len(start) != U:
        raise ValueError(f"start gives {len(start)} candidates for {U} units.")
    lv = _Levels(cost, tie_groups(U, list(ties or [])), allowed)
    level = lv.levels(start)
    start_cost = float(sum(cost[u, start[u]] for u in range(U)))
    if start_cost > budget * (1 + 1e-9):
        raise BudgetError(f"the starting allocation costs {start_cost:.6g}, over the budget {budget:.6g}.")
    if min(offspring, survivors, generations) < 1 or survivors > offspring:
        raise ValueError("need generations ≥ 1 and 1 ≤ survivors ≤ offspring.")
    rng = np.random.default_rng(seed)
    # a fitness that scores many configurations at once (``fitness.many``) shares their work
    scores = getattr(fitness, "many", None) or (lambda choices, full: [fitness(c, full) for c in choices])

    if resume is None:
        best = level
        best_score = fitness(lv.choice(best), True)
        start_score = best_score
        seen = {tuple(best)}
        calls = {"screen": 0, "full": 1}
        history = [{"generation": 0, "score": best_score, "cost": lv.total(best)}]
        last = first = 0  # generation of the last improvement; generations done
    else:
        best, best_score, start_score = list(resume["best"]), resume["best_score"], resume["start_score"]
        seen = {tuple(k) for k in resume["seen"]}
        calls, history, last, first = dict(resume["calls"]), list(resume["history"]), resume["last"], resume["generation"]
        rng.bit_generator.state = resume["rng"]
        _restore(fitness, redraw, lv.choice(best), first, generations)

    def state(gen: int) -> dict:
        return {"generation": gen, "best": list(best), "best_score": best_score, "start_score": start_score,
                "seen": [list(k) for k in seen], "calls": calls, "history": history, "last": last,
                "rng": rng.bit_generator.state}

    bar = tqdm(range(first + 1, generations + 1), desc="search", disable=not progress, unit="gen", initial=first,
               total=generations)
    for gen in bar:
        if redraw is not None and gen > 1:  # fresh windows, and the parent's loss on them
            redraw(gen - 1)
            best_score = scores([lv.choice(best)], True)[0]
            calls["full"] += 1
        # fresh children only; the longer no child has been better, the further they may jump
        kids = lv.children(best, offspring, max_mutations + (gen - 1 - last) // 10, budget, rng, seen)
        if not kids:
            if checkpoint is not None:
                checkpoint(state(gen))
            continue
        screened = sorted(zip(scores([lv.choice(k) for k in kids], False), kids), key=lambda t: t[0])
        calls["screen"] += len(kids)
        finalists = [k for _, k in screened[:survivors]]
        for k, s in zip(finalists, scores([lv.choice(k) for k in finalists], True)):
            calls["full"] += 1
            if s < best_score:
                best, best_score, last = k, s, gen
                history.append({"generation": gen, "score": s, "cost": lv.total(k)}
                               | ({"windows": gen - 1} if redraw is not None else {}))
        bar.set_postfix(loss=f"{best_score:.4f}")
        if checkpoint is not None:
            checkpoint(state(gen))
    return SearchResult(lv.choice(best), lv.total(best), best_score, start_score, calls, time.perf_counter() - t0, history)
