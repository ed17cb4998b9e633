"""The bit allocator against brute force, its budget, its errors, and its monotonicity."""
import numpy as np
import pytest

from quant.allocate import BudgetError, Problem, bisect_budget, brute_force, frontier, solve


def random_problem(rng, U=4, C=3, pairs=True, ties=False):
    D = np.sort(rng.random((U, C)), axis=1)[:, ::-1].copy()  # fewer bits, more damage
    cost = np.sort(rng.integers(1, 12, (U, C)), axis=1).astype(float)
    P = {}
    if pairs:
        for i in range(U - 1):
            P[(i, i + 1)] = rng.normal(scale=0.4, size=(C, C))
        P[(0, U - 1)] = rng.normal(scale=0.4, size=(C, C))
    return Problem(D, cost, P, [(0, 2)] if ties else [])


@pytest.mark.parametrize("solver", ["highs", "cbc"])
@pytest.mark.parametrize("pairs", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_ilp_equals_brute_force(pairs, ties, solver):
    rng = np.random.default_rng(1 + 2 * pairs + ties)
    for _ in range(12):
        p = random_problem(rng, pairs=pairs, ties=ties)
        budget = float(rng.uniform(p.min_cost(), p.cost.max(axis=1).sum()))
        sol = solve(p, budget, gap_rel=0.0, solver=solver)
        best = brute_force(p, budget)
        assert sol.status == f"Optimal ({solver})"
        assert solver == "cbc" or sol.gap <= 1e-6  # HiGHS proves its bound; CBC reports the LP relaxation's
        assert sol.objective == pytest.approx(best[1], abs=1e-7)
        assert sol.cost <= budget + 1e-9  # never over budget
        assert sol.objective == pytest.approx(p.objective(sol.choice))
        if ties:
            assert sol.choice[0] == sol.choice[2]


@pytest.mark.parametrize("solver", ["highs", "cbc"])
def test_signed_tables_around_a_measured_configuration(solver):
    """The ``context`` objective: D is a loss change around a configuration (negative for wider
    candidates) plus a constant offset; the ILP still equals brute force and reports a valid gap."""
    rng = np.random.default_rng(7)
    for _ in range(8):
        p = random_problem(rng, pairs=False)
        p = Problem(p.D - p.D[:, [1]], p.cost, offset=float(rng.uniform(1, 3)))  # 0 at candidate 1
        budget = float(rng.uniform(p.min_cost(), p.cost.max(axis=1).sum()))
        sol = solve(p, budget, gap_rel=0.0, solver=solver)
        best = brute_force(p, budget)
        assert sol.objective == pytest.approx(best[1], abs=1e-7)
        assert sol.objective == pytest.approx(p.offset + sum(p.D[u, c] for u, c in enumerate(sol.choice)))
        assert 0.0 <= sol.gap < 1.0
        assert solver == "cbc" or sol.gap <= 1e-6  # HiGHS's proven bound, shifted by the same offset


def test_pair_terms_change_the_answer():
    """A strong positive interaction makes the solver split the damage that pure additivity would pair up."""
    D = np.array([[1.0, 0.0], [1.0, 0.0], [1.2, 0.0]])
    cost = np.array([[1.0, 2.0]] * 3)
    additive = solve(Problem(D, cost), 4.0)
    assert sorted(additive.choice) == [0, 0, 1]  # the worst unit (2) gets the extra bits
    P = {(0, 1): np.array([[5.0, 0.0], [0.0, 0.0]])}
    coupled = solve(Problem(D, cost, P), 4.0, gap_rel=0.0)
    assert coupled.choice[2] == 0 and {coupled.choice[0], coupled.choice[1]} == {0, 1}
    assert coupled.objective == pytest.approx(brute_force(Problem(D, cost, P), 4.0)[1])


def test_infeasible_budget_names_the_minimum():
    p = Problem(np.ones((3, 2)), np.array([[2.0, 4.0]] * 3))
    with pytest.raises(BudgetError, match="below the cheapest configuration, 6"):
        solve(p, 5.0)
    p_tied = Problem(np.ones((2, 2)), np.array([[1.0, 5.0], [9.0, 2.0]]), ties=[(0, 1)])
    assert p_tied.min_cost() == 7.0  # both at candidate 1, not 1 + 2
    with pytest.raises(BudgetError):
        solve(p_tied, 6.0)


def test_more_budget_never_raises_predicted_loss():
    rng = np.random.default_rng(7)
    p = random_problem(rng, U=6, C=4, pairs=True)
    budgets = np.linspace(p.min_cost(), p.cost.max(axis=1).sum(), 9)
    objs = [solve(p, b, gap_rel=0.0).objective for b in budgets]
    assert all(b <= a + 1e-9 for a, b in zip(objs, objs[1:]))
    front = frontier(p, budgets)
    assert all(s2.cost > s1.cost and s2.objective < s1.objective for s1, s2 in zip(front, front[1:]))


def test_solve_time_224_units_5_candidates():
    rng = np.random.default_rng(0)
    U, C = 224, 5
    D = np.sort(rng.random((U, C)), axis=1)[:, ::-1].copy()
    D[:, -1] = 0.0
    cost = np.tile([2.2, 3.2, 4.2, 8.2, 16.0], (U, 1)) * rng.integers(1, 4, (U, 1))
    problem = Problem(D, cost)
    sol = solve(problem, 0.25 * cost.sum())
    assert sol.status.startswith("Optimal") and sol.cost <= 0.25 * cost.sum()
    # the reported gap is measured against the LP relaxation: a valid bound, so it is ≥ 0 and small
    assert 0.0 <= sol.gap < 0.05
    greedy = problem.objective(np.zeros(U, dtype=int))  # all at the cheapest candidate fits too
    assert sol.objective < greedy  # timing itself is reported by bench/mixed_precision.py


def test_bisection_finds_smallest_passing_budget():
    seen = []

    def measure(b):
        seen.append(b)
        return 10.0 / b  # "perplexity" falls as the budget grows

    best, history = bisect_budget(measure, 2.0, 8.0, lambda v: v <= 3.0, steps=12)
    assert best == pytest.approx(10 / 3, abs=1e-2) and best >= 10 / 3
    assert [b for b, _ in history] == seen
    with pytest.raises(BudgetError, match="largest budget"):
        bisect_budget(measure, 2.0, 8.0, lambda v: v <= 1.0)


def test_all_zero_pair_terms_add_no_variables():
    """An all-zero pair term cannot change the optimum, so the program leaves it out (the SmolLM2
    measurement has half its 644 interactions clipped to zero)."""
    from quant.allocate import _build

    rng = np.random.default_rng(3)
    p = random_problem(rng, U=5, C=3, pairs=True)
    zeroed = Problem(p.D, p.cost, {**p.pairs, (0, 2): np.zeros((3, 3)), (1, 3): np.zeros((3, 3))})
    prob, _ = _build(zeroed, p.cost.min(axis=1).sum() + 5, relax=False)
    names = {v.name for v in prob.variables()}
    assert not any(n.startswith(("y_0_2_", "y_1_3_")) for n in names)
    assert any(n.startswith("y_0_1_") for n in names)
    budget = float(p.cost.min(axis=1).sum() + 5)
    assert solve(zeroed, budget, gap_rel=0.0).objective == pytest.approx(brute_force(zeroed, budget)[1], abs=1e-7)


def test_the_solver_prints_nothing():
    """HiGHS's banner (written to the process's stdout on its first solver) stays out of a command's
    output, which may be JSON."""
    import subprocess
    import sys

    pytest.importorskip("highspy")
    code = ("import numpy as np\nfrom quant.allocate import Problem, solve\n"
            "p = Problem(np.array([[2.0, 1.0, 0.0]]), np.array([[2.0, 3.0, 4.0]]))\n"
            "print(solve(p, 3.0, solver='highs').choice)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[1]", out
