"""Bit allocation as pure functions on measured tables: an exact integer program (``pulp``, with
HiGHS or CBC), the Pareto frontier of (cost, predicted loss), and a brute-force twin for tests.

The problem (HAWQ-V2 §3.3; *Augmenting Hessians with Inter-Layer Dependencies*, §3): pick one
candidate ``c_u`` per unit ``u`` to minimise

    Σ_u D[u, c_u]  +  Σ_{(i,j)} P_ij[c_i, c_j]        subject to   Σ_u cost[u, c_u] ≤ budget

``D`` is the predicted loss increase of each unit alone, ``P_ij`` the inter-layer correction for
a pair quantized together. Products of binaries are linearised exactly with the *assignment*
form: continuous ``y_ij[a, b] ≥ 0`` with ``Σ_b y[a, b] = x_ia`` and ``Σ_a y[a, b] = x_jb``; for
binary ``x`` with one choice per unit the only feasible ``y`` is ``x_ia · x_jb``, and its LP
relaxation is tighter than the usual three McCormick inequalities.
"""
from __future__ import annotations

import functools
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pulp


class BudgetError(ValueError):
    """The budget cannot be met (or is malformed); the message gives the feasible range."""


@dataclass
class Problem:
    """``D`` and ``cost`` are (units, candidates); ``pairs`` maps (i, j), i < j, to a (C, C) array."""

    D: np.ndarray
    cost: np.ndarray
    pairs: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    ties: list[tuple[int, int]] = field(default_factory=list)  # units that must take the same candidate
    offset: float = 0.0  # constant added to the objective (the loss of the configuration D is measured around)

    def __post_init__(self) -> None:
        self.D = np.asarray(self.D, dtype=float)
        self.cost = np.asarray(self.cost, dtype=float)
        if self.D.shape != self.cost.shape or self.D.ndim != 2:
            raise ValueError(f"D {self.D.shape} and cost {self.cost.shape} must both be (units, candidates).")

    @property
    def shape(self) -> tuple[int, int]:
        return self.D.shape

    def objective(self, choice) -> float:
        choice = list(choice)
        total = self.offset + float(sum(self.D[u, c] for u, c in enumerate(choice)))
        return total + float(sum(P[choice[i], choice[j]] for (i, j), P in self.pairs.items()))

    def total_cost(self, choice) -> float:
        return float(sum(self.cost[u, c] for u, c in enumerate(choice)))

    def min_cost(self) -> float:
        if not self.ties:
            return float(self.cost.min(axis=1).sum())
        return min_cost_tied(self.cost, self.ties)


def min_cost_tied(cost: np.ndarray, ties: list[tuple[int, int]]) -> float:
    """Cheapest total cost when tied units must share a candidate (ties form groups)."""
    groups = tie_groups(cost.shape[0], ties)
    return float(sum(cost[g].sum(axis=0).min() for g in groups))


def tie_groups(n: int, ties: list[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in ties:
        parent[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for u in range(n):
        groups.setdefault(find(u), []).append(u)
    return list(groups.values())


@dataclass
class Solution:
    choice: list[int]  # candidate index per unit
    objective: float  # predicted loss increase
    cost: float
    status: str  # pulp's status ("Optimal", ...)
    gap: float  # relative gap to the LP-relaxation bound (an upper bound on the true gap)
    seconds: float


def _build(problem: Problem, budget: float, relax: bool):
    U, C = problem.shape
    cat = pulp.LpContinuous if relax else pulp.LpBinary
    prob = pulp.LpProblem("hmq_bits", pulp.LpMinimize)
    x = {(u, c): pulp.LpVariable(f"x_{u}_{c}", 0, 1, cat) for u in range(U) for c in range(C)
         if np.isfinite(problem.D[u, c]) and np.isfinite(problem.cost[u, c])}
    terms = [(problem.D[u, c], x[u, c]) for (u, c) in x]
    for (i, j), P in problem.pairs.items():
        if not np.any(P[np.ix_(*[[c for c in range(C) if (u, c) in x] for u in (i, j)])]):
            continue  # an all-zero term changes nothing; its C² variables would only slow the solver
        y = {(a, b): pulp.LpVariable(f"y_{i}_{j}_{a}_{b}", 0) for a in range(C) for b in range(C)
             if (i, a) in x and (j, b) in x}
        terms += [(P[a, b], v) for (a, b), v in y.items()]
        for a in range(C):  # assignment linearisation: Σ_b y_ab = x_ia, Σ_a y_ab = x_jb
            if (i, a) in x:
                prob += pulp.lpSum(y[a, b] for b in range(C) if (a, b) in y) == x[i, a]
        for b in range(C):
            if (j, b) in x:
                prob += pulp.lpSum(y[a, b] for a in range(C) if (a, b) in y) == x[j, b]
    prob += pulp.LpAffineExpression([(v, float(coef)) for coef, v in terms])
    for u in range(U):
        prob += pulp.lpSum(x[u, c] for c in range(C) if (u, c) in x) == 1
    for a, b in problem.ties:
        for c in range(C):
            prob += x.get((a, c), 0) == x.get((b, c), 0)
    prob += pulp.lpSum(problem.cost[u, c] * x[u, c] for (u, c) in x) <= budget
    return prob, x


def _solver_name(solver: str) -> str:
    if solver == "auto":
        try:
            import highspy  # noqa: F401
        except ImportError:
            return "cbc"
        return "highs"
    if solver not in ("highs", "cbc"):
        raise ValueError(f"solver {solver!r} is unknown: use highs, cbc or auto.")
    return solver


@functools.cache
def _quiet_highs() -> None:
    """HiGHS writes its copyright banner to the process's stdout when it makes its first solver,
    whatever ``msg`` says (once per process): make that first one with stdout pointed at /dev/null,
    so the banner never lands in a command's output (or its ``--json``)."""
    import highspy

    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def solve(problem: Problem, budget: float, time_limit: float | None = 20.0, gap_rel: float = 5e-3,
          solver: str = "auto") -> Solution:
    """The optimum under ``Σ cost ≤ budget``, to within ``gap_rel`` of the best bound, or the best
    solution found in ``time_limit`` seconds (``status`` says which, ``gap`` how far from the
    proven bound it may be). ``solver``: ``highs`` (HiGHS through pulp; several times faster than
    CBC on these problems, and it reports its own bound), ``cbc`` (pulp's bundled CBC; the bound is
    then the LP relaxation's), ``auto`` (HiGHS when ``highspy`` is installed). Raises
    :class:`BudgetError` when no configuration fits, naming the smallest cost that does."""
    t0 = time.perf_counter()
    floor = problem.min_cost()
    if budget < floor - 1e-9:
        raise BudgetError(f"budget {budget:g} is below the cheapest configuration, {floor:g}")
    U, C = problem.shape
    name = _solver_name(solver)
    prob, x = _build(problem, budget, relax=False)
    if name == "highs":
        _quiet_highs()
        prob.solve(pulp.HiGHS(msg=False, gapRel=gap_rel, timeLimit=time_limit))
    else:
        # CBC's integer preprocessing returns wrong "optimal" answers on some of these knapsack-like
        # problems (found by the brute-force test), so it is turned off.
        prob.solve(pulp.PULP_CBC_CMD(msg=False, gapRel=gap_rel, timeLimit=time_limit, options=["preprocess off"]))
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        raise BudgetError(f"the integer program found no solution at budget {budget:g} "
                          f"({name}: {pulp.LpSolution.get(prob.sol_status, prob.sol_status)})")
    status_name = ("Optimal" if gap_rel == 0 else f"Optimal within {gap_rel:.1%}") if prob.sol_status == pulp.LpSolutionOptimal \
        else "Feasible (time limit)"
    choice = []
    for u in range(U):
        vals = [(x[u, c].value() or 0.0, c) for c in range(C) if (u, c) in x]
        choice.append(max(vals)[1])
    objective = problem.objective(choice)
    if name == "highs":
        bound = float(prob.solverModel.getInfo().mip_dual_bound) + problem.offset
    else:
        relaxed, _ = _build(problem, budget, relax=True)
        relaxed.solve(pulp.PULP_CBC_CMD(msg=False))
        bound = pulp.value(relaxed.objective) + problem.offset if relaxed.status == 1 else -math.inf
    bound = bound if math.isfinite(bound) else -math.inf
    gap = 0.0 if objective - bound <= 1e-12 else (objective - bound) / max(abs(objective), 1e-12)
    return Solution(choice, objective, problem.total_cost(choice), f"{status_name} ({name})", gap,
                    time.perf_counter() - t0)


def brute_force(problem: Problem, budget: float) -> tuple[list[int], float] | None:
    """Exhaustive twin of :func:`solve` for small problems (tests)."""
    U, C = problem.shape
    best = None
    for choice in itertools.product(range(C), repeat=U):
        if any(choice[a] != choice[b] for a, b in problem.ties):
            continue
        if problem.total_cost(choice) > budget + 1e-9:
            continue
        obj = problem.objective(choice)
        if best is None or obj < best[1] - 1e-12:
            best = (list(choice), obj)
    return best


def frontier(problem: Problem, budgets) -> list[Solution]:
    """Optimal configurations at each budget, with dominated points removed: the Pareto frontier
    of (cost, predicted loss) sampled at ``budgets`` (HAWQ-V2 Fig. 1)."""
    sols = []
    floor = problem.min_cost()
    for b in sorted(budgets):
        if b >= floor - 1e-9:
            sols.append(solve(problem, b))
    kept, best = [], math.inf
    for s in sorted(sols, key=lambda s: (s.cost, s.objective)):
        if s.objective < best - 1e-12:
            kept.append(s)
            best = s.objective
    return kept


def bisect_budget(measure, lo: float, hi: float, ok, steps: int = 6) -> tuple[float, list[tuple[float, float]]]:
    """Smallest budget in ``[lo, hi]`` whose measured value passes ``ok`` (monotone), by bisection.

    ``measure(budget)`` returns the measured quality (e.g. perplexity); ``hi`` is assumed to pass
    unless measured otherwise. Returns (budget, [(budget, value), ...] in the order measured)."""
    history = []
    v_hi = measure(hi)
    history.append((hi, v_hi))
    if not ok(v_hi):
        raise BudgetError(f"even the largest budget {hi:g} gives {v_hi:g}, which misses the target")
    best = hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        v = measure(mid)
        history.append((mid, v))
        if ok(v):
            best = hi = mid
        else:
            lo = mid
    return best, history
