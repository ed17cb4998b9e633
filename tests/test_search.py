"""Allocation search: the pure evolution against brute force on small non-additive problems, its
budget and tie guarantees; the candidate database against the model `quantize` builds; the stitched
loss's cached prefix against a full recomputation."""
import itertools
import math

import numpy as np
import pytest
import torch

from calibration.search import StitchedLoss, candidate_database
from calibration.units import build_units, candidate_cost, parse_candidates
from quant.allocate import BudgetError
from quant.arch import get_arch
from quant.config import QuantConfig
from quant.search import evolve

from .conftest import build_tiny, windows


def _problem(seed: int, U: int = 6, C: int = 3):
    rng = np.random.default_rng(seed)
    size = rng.integers(1, 4, U)[:, None]
    cost = size * np.array([2.0, 3.0, 4.0])[None, :C]
    D = np.sort(rng.random((U, C)), axis=1)[:, ::-1] * size
    W = rng.normal(scale=0.3, size=(U, U))

    def loss(choice):  # non-additive: pairwise interactions and a convex blow-up of the sum
        d = np.array([D[u, c] for u, c in enumerate(choice)])
        return float(d.sum() + d @ W @ d * 0.1 + np.exp(d.sum() / U))

    return cost, loss


def _brute(cost, budget, loss, ties=()):
    U, C = cost.shape
    best = None
    for choice in itertools.product(range(C), repeat=U):
        if any(choice[a] != choice[b] for a, b in ties):
            continue
        if sum(cost[u, c] for u, c in enumerate(choice)) <= budget + 1e-9:
            v = loss(choice)
            if best is None or v < best[1]:
                best = (list(choice), v)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evolve_finds_the_brute_force_optimum_of_a_non_additive_loss(seed):
    cost, loss = _problem(seed)
    budget = 3.0 * cost[:, 0].sum() / 2.0  # 3 bits on average
    start = [1] * len(cost)  # every unit at the middle candidate: feasible, rarely optimal
    seen = []

    def fitness(choice, full):
        seen.append(list(choice))
        return loss(choice)

    res = evolve(cost, budget, start, fitness, generations=150, offspring=6, survivors=2, seed=seed, progress=False)
    best, value = _brute(cost, budget, loss)
    assert res.score == pytest.approx(value)
    assert loss(res.choice) == pytest.approx(res.score)
    assert res.start_score == pytest.approx(loss(start)) and res.score <= res.start_score
    assert all(sum(cost[u, c] for u, c in enumerate(ch)) <= budget + 1e-9 for ch in seen)  # never over budget
    assert res.evaluations["full"] + res.evaluations["screen"] == len(seen)


def test_evolve_keeps_ties_and_masks_and_refuses_bad_starts():
    cost, loss = _problem(3)
    budget = 3.0 * cost[:, 0].sum() / 2.0
    ties = [(0, 1), (2, 3)]
    allowed = np.ones(cost.shape, bool)
    allowed[4, 2] = False  # unit 4 may not take the widest candidate
    seen = []

    def fitness(choice, full):
        seen.append(list(choice))
        return loss(choice)

    res = evolve(cost, budget, [1] * 6, fitness, generations=60, ties=ties, allowed=allowed, progress=False)
    assert all(ch[0] == ch[1] and ch[2] == ch[3] and ch[4] != 2 for ch in seen)
    masked = lambda ch: math.inf if ch[4] == 2 else loss(ch)  # noqa: E731
    assert res.score == pytest.approx(_brute(cost, budget, masked, ties)[1])
    with pytest.raises(BudgetError, match="over the budget"):
        evolve(cost, 1.0, [1] * 6, fitness, generations=1, progress=False)
    with pytest.raises(ValueError, match="tie group"):
        evolve(cost, budget, [0, 1, 1, 1, 1, 1], fitness, generations=1, ties=ties, progress=False)


def _tiny_units():
    model, arch = build_tiny("llama"), get_arch("llama")
    cands = parse_candidates(["2g-1", "3g-1", "4g-1"], -1, keep=True)
    units = build_units(model, arch)
    cost = [[candidate_cost(u, c, False) for c in cands] for u in units]
    return model, arch, cands, units, cost


def test_database_at_the_anchor_is_the_model_quantize_builds():
    """Each layer's candidates are GPTQ'd on the anchor model's inputs, true-sequentially inside the
    layer, so the anchor's candidates are the weights `quantize_model` builds for that allocation;
    on fp inputs (anchor: keep 16 everywhere) the later layers' candidates are other weights."""
    from quant.pipeline import quantize_model

    model, arch, cands, units, cost = _tiny_units()
    calib = windows(4, 32)
    anchor = [k % 3 for k in range(len(units))]  # a mixed allocation: 2, 3 and 4 bits
    base = QuantConfig(method="gptq", group_size=-1)
    db = candidate_database(model, arch, units, cands, cost, calib, base, torch.device("cpu"), anchor, progress=False)
    assert set(db) == {(k, c) for k in range(len(units)) for c in range(3)}  # no entries for keep-16
    fp_db = candidate_database(model, arch, units, cands, cost, calib, base, torch.device("cpu"), [3] * len(units),
                               progress=False)
    overrides = {f"^{m}$": {"bits": cands[anchor[k]].bits, "group_size": -1} for k, u in enumerate(units)
                 for m in u.members}
    built = build_tiny("llama")
    # the database solves with the row mix of both range searches, without the per-layer pick
    quantize_model(built, arch, calib, QuantConfig(method="gptq", group_size=-1, overrides=overrides, clip_layer="off"),
                   torch.device("cpu"), progress=False)
    last = [k for k, u in enumerate(units) if u.layer == units[-1].layer]
    for k in range(len(units)):
        for m in units[k].members:
            ref = built.get_submodule(m).dequantize(torch.float32)
            tol = 1e-6 * ref.abs().max()
            seq_off = ((db[(k, anchor[k])][m].float() - ref).abs() > tol).float().mean()
            fp_off = ((fp_db[(k, anchor[k])][m].float() - ref).abs() > tol).float().mean()
            assert seq_off == 0, m  # the same codes
            if k in last or units[k].members[0].endswith(("o_proj", "down_proj")):
                assert fp_off > 0.05, m  # their inputs depend on quantized weights in front
    db.close(), fp_db.close()


def test_stitched_loss_from_the_cached_prefix_equals_a_full_pass():
    model, arch, cands, units, cost = _tiny_units()
    calib, ids = windows(4, 32), windows(3, 32, seed=7)
    anchor = [1] * len(units)
    db = candidate_database(model, arch, units, cands, cost, calib, QuantConfig(method="gptq", group_size=-1),
                            torch.device("cpu"), anchor, progress=False)
    fit = StitchedLoss(model, arch, units, db, ids, torch.device("cpu"), screen=1)
    fit(anchor, True)  # becomes the reference: its layer outputs are cached
    late = list(anchor)
    late[-1] = 0  # a unit in the last layer: only that layer is recomputed
    early = list(anchor)
    early[0] = 2
    both = list(late)
    both[0] = 2  # changes in the first and the last layer: computed from the first
    for choice in (late, early, both, anchor):
        for full in (True, False):
            fresh = StitchedLoss(model, arch, units, db, ids, torch.device("cpu"), screen=1)
            assert fit(choice, full) == pytest.approx(fresh(choice, full), abs=1e-5)
    assert fit(late, True) != pytest.approx(fit(anchor, True), abs=1e-4)  # the change is seen
    fit.best = math.inf  # the next full score becomes the reference, its outputs rebuilt from the last layer only
    fit(late, True)
    assert fit.ref == late
    for choice in (anchor, early, both):
        for full in (True, False):
            fresh = StitchedLoss(model, arch, units, db, ids, torch.device("cpu"), screen=1)
            assert fit(choice, full) == pytest.approx(fresh(choice, full), abs=1e-5)
    assert fit(anchor, False) != pytest.approx(fit(anchor, True), abs=1e-4)  # screening uses fewer windows
    db.close()


def test_one_pass_for_a_first_full_score_and_windows_drawn_afresh():
    """A loss's first full score builds its reference and scores from it in one pass: the value the
    shared-visit path gives, bit for bit. :class:`Redrawn` set ``d`` is a loss on those windows of
    its pool, with their fp distributions taken from the pool's: the value a loss built on just those
    windows gives."""
    from calibration.search import KLScore, Redrawn

    model, arch, cands, units, cost = _tiny_units()
    calib, pool = windows(4, 32), windows(6, 32, seed=7)
    anchor = [1] * len(units)
    cpu = torch.device("cpu")
    db = candidate_database(model, arch, units, cands, cost, calib, QuantConfig(method="gptq", group_size=-1),
                            cpu, anchor, progress=False)
    other = [0] * len(units)
    for score in (None, KLScore(model, arch, pool, cpu, 16)):
        one = StitchedLoss(model, arch, units, db, pool, cpu, screen=1, score=score).many([anchor], True)[0]
        shared = StitchedLoss(model, arch, units, db, pool, cpu, screen=1, score=score).many([anchor, other], True)[0]
        assert one == shared
    drawn = Redrawn(model, arch, units, db, pool, cpu, samples=3, screen=1, score=KLScore(model, arch, pool, cpu, 16),
                    seed=5)
    assert drawn.rows.tolist() == [0, 1, 2]  # set 0: the first windows
    seen = set()
    for d in (1, 2, 3):
        drawn.draw(d)
        rows = drawn.rows.tolist()
        assert len(set(rows)) == 3 and all(0 <= r < 6 for r in rows)
        seen.add(tuple(rows))
        alone = StitchedLoss(model, arch, units, db, pool[drawn.rows], cpu, screen=1,
                             score=KLScore(model, arch, pool[drawn.rows], cpu, 16))
        for choice in (anchor, other):
            assert drawn(choice, True) == pytest.approx(alone(choice, True), rel=1e-6)
            assert drawn(choice, False) == pytest.approx(alone(choice, False), rel=1e-6)
    assert len(seen) > 1  # the sets differ
    again = Redrawn(model, arch, units, db, pool, cpu, samples=3, screen=1, score=KLScore(model, arch, pool, cpu, 16),
                    seed=5)
    again.draw(3)
    assert again.rows.tolist() == drawn.rows.tolist()  # seeded: a resumed search draws the same
    db.close()


def test_evolve_on_windows_drawn_afresh():
    """With ``redraw`` each generation after the first moves the fitness to new windows and scores the
    parent there again; a child is kept only when lower than the parent on the same windows."""
    cost, loss = _problem(0)
    budget = 3.0 * cost[:, 0].sum() / 2.0
    draws, log = [], []
    state = {"d": 0}

    def fitness(choice, full):
        value = loss(choice) + 0.01 * state["d"]  # the same offset for every configuration on one set of windows
        log.append((state["d"], list(choice), full, value))
        return value

    def redraw(d):
        draws.append(d)
        state["d"] = d

    res = evolve(cost, budget, [1] * len(cost), fitness, generations=12, offspring=4, survivors=2, seed=1,
                 progress=False, redraw=redraw)
    assert draws == list(range(1, 12))
    for d in draws:  # the first full call on each new set scores the parent
        first = next(entry for entry in log if entry[0] == d)
        assert first[2] is True
    assert res.score == pytest.approx(loss(res.choice) + 0.01 * 11)  # the parent, on the last set
    assert res.evaluations["full"] + res.evaluations["screen"] == len(log)
    assert all(h["windows"] == h["generation"] - 1 for h in res.history[1:])  # kept on the set it was scored on
    plain = evolve(cost, budget, [1] * len(cost), lambda c, f: loss(c), generations=12, offspring=4, survivors=2,
                   seed=1, progress=False)
    assert res.choice == plain.choice  # an offset shared on each set changes no comparison


@pytest.mark.parametrize("killed_after", [1, 5, 12])
def test_a_resumed_search_on_fresh_windows_ends_as_the_uninterrupted_one(killed_after):
    """Resumed from the state saved after a generation (the last one too), the search ends with the
    same choice and score, and its fitness on the same windows, as the uninterrupted one."""
    import copy as copy_

    cost, loss = _problem(2)
    budget = 3.0 * cost[:, 0].sum() / 2.0

    def run(resume=None):
        at = {"d": 0}
        saved = []

        def fitness(choice, full):  # each set of windows shifts and tilts the losses its own way
            return loss(choice) * (1 + 0.05 * math.sin(at["d"] + sum(choice))) + 0.01 * at["d"]

        res = evolve(cost, budget, [1] * len(cost), fitness, generations=12, offspring=4, survivors=2, seed=3,
                     progress=False, redraw=lambda d: at.update(d=d), resume=resume,
                     checkpoint=lambda st: saved.append(copy_.deepcopy(st)))
        return res, saved, at["d"]

    whole, states, last_set = run()
    resumed, _, resumed_set = run(states[killed_after - 1])
    assert states[killed_after - 1]["generation"] == killed_after
    assert resumed.choice == whole.choice and resumed.score == whole.score
    assert resumed_set == last_set == 11
