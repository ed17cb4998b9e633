"""The default mixed recipe (calibration/select.py): the KL it scores, the widths and anchor it
takes, never worse than a uniform scheme that fits, the model written is the one scored, the
stitched anchor is uniform GPTQ, and the command line runs it (presets, resume after a kill)."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from .conftest import Killed, build_tiny, run, windows

COMMON = ["--nsamples", 4, "--seqlen", 32, "--group-size", 32, "--no-progress"]
SEARCH = ["--search", 3, "--search-samples", 4, "--search-seqlen", 32, "--search-offspring", 4, "--search-screen", 1]
CONFIGS = Path(__file__).parents[1] / "configs"


def test_top_k_kl_is_the_kl_of_the_coarsened_distributions():
    from quant.evaluate import kl_terms, top_k_kl, top_k_reference

    p, q = torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[0.5, 0.3, 0.2]])
    idx, top = top_k_reference(p.log(), 1)
    # by hand: outcomes {first, rest}: (0.7, 0.3) against (0.5, 0.5)
    assert float(top_k_kl(q.log(), idx, top)) == pytest.approx(0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5),
                                                                rel=1e-5)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 50, generator=g) * 3
    b = a + torch.randn(40, 50, generator=g)
    full, _ = kl_terms(torch.log_softmax(b, -1), torch.log_softmax(a, -1))
    whole = top_k_kl(b, *top_k_reference(a, 50))
    assert torch.allclose(whole, full, atol=1e-5)  # k = vocabulary: the KL itself
    kls = [float(top_k_kl(b, *top_k_reference(a, k)).mean()) for k in (1, 4, 16, 50)]
    assert all(x <= y + 1e-6 for x, y in zip(kls, kls[1:])) and kls[0] < kls[-1]  # coarser: never more


def test_widths_around_the_budget_and_the_anchor_above_it():
    from calibration.select import anchor_of, pick_widths

    totals = {2: 2.3, 3: 3.3, 4: 4.3, 8: 8.3}
    assert pick_widths(totals, 3.0) == [2, 3, 4]
    assert pick_widths(totals, 3.3) == [2, 3, 4]  # the anchor w3 and its neighbours
    assert pick_widths(totals, 3.5) == [3, 4, 8]
    assert pick_widths(totals, 2.0) == [2, 3]
    assert pick_widths(totals, 9.0) == [4, 8]
    uniform = [(0, 2.3), (1, 3.3), (2, 4.3)]
    assert [anchor_of(uniform, b) for b in (2.0, 3.0, 3.3, 4.0, 9.0)] == [0, 1, 1, 2, 2]


def test_the_ladder_of_group_sizes_and_the_candidates_around_the_budget():
    from calibration.select import ladder, pick_widths
    from calibration.units import parse_candidates

    labels = ladder([2, 3, 4], 64)
    assert sorted(labels) == sorted(["2", "3", "4", "2g-1", "3g-1", "4g-1", "2g32", "3g32", "4g32"])
    assert ladder([2, 3], 32) == ["2", "3", "2g-1", "3g-1"] and ladder([2, 3], -1) == ["2", "3"]
    assert ladder([2, 3], 64, on=False) == ["2", "3"]
    # SmolLM2's prices (bpw): two each side of the anchor, in price order, whatever the label order
    bpw = {"w2g-1": 2.03, "w2g64": 2.28, "w2g32": 2.56, "w3g-1": 3.03, "w3g64": 3.30, "w3g32": 3.59, "w4g-1": 4.03}
    cands = {c.label: c for c in parse_candidates(list(bpw), 64, False)}
    totals = {cands[k]: v for k, v in reversed(bpw.items())}
    assert [c.label for c in pick_widths(totals, 3.0, 2)] == ["w2g64", "w2g32", "w3g-1", "w3g64", "w3g32"]
    assert [c.label for c in pick_widths(totals, 3.297, 2)] == ["w2g32", "w3g-1", "w3g64", "w3g32", "w4g-1"]
    assert [c.label for c in pick_widths(totals, 2.0, 2)] == ["w2g-1", "w2g64", "w2g32"]


def test_errors_calibrated_by_one_measured_point():
    import numpy as np

    from calibration.select import calibrated_errors

    cost = np.array([[2.0, 3.0, 4.0, 16.0], [2.0, 3.0, 4.0, 16.0], [np.inf, 3.0, 4.0, 16.0]])
    errors = {(0, 0): 0.3, (0, 1): 0.1, (0, 2): 0.02, (1, 0): 0.4, (1, 1): 0.2, (1, 2): 0.05, (2, 1): 0.1, (2, 2): 0.01}
    D = calibrated_errors(errors, cost, anchor=1, probe=[0, 0, 1], base=0.5, single=[0.8, 0.45, 0.5])
    # unit 0: α = (0.8 - 0.5) / (0.3 - 0.1) = 1.5; keeping 16 bits has no error
    assert D[0] == pytest.approx([0.3, 0.0, -0.12, -0.15])
    assert D[1] == pytest.approx([0.0, 0.0, 0.0, 0.0])  # narrowing it measured no harm: α = 0
    assert np.isinf(D[2, 0]) and D[2, 1:] == pytest.approx([0.0, 0.0, 0.0])  # no probe width: α = 0


class AddedUp:
    """A fitness on plain data: a configuration's score is the sum of a per-unit, per-candidate table
    (screened with noise), with the ``many`` method :func:`calibration.select.select` calls."""

    def __init__(self, table, noise=0.0):
        import numpy as np

        self.table, self.rng, self.noise = table, np.random.default_rng(0), noise

    def many(self, choices, full):
        return [float(sum(self.table[k][c] for k, c in enumerate(ch))) + (0 if full else self.noise * self.rng.random())
                for ch in choices]

    def __call__(self, choice, full):
        return self.many([choice], full)[0]


@pytest.mark.parametrize("rejected", [False, True, "noise"])
def test_select_starts_from_the_best_that_fits_and_keeps_the_lowest_on_the_confirmation_windows(rejected):
    import numpy as np

    from calibration.select import SelectOptions, select
    from calibration.units import Candidate, Unit

    units = [Unit(f"u{k}", (f"u{k}",), k, "mlp.down_proj", 64, 64, (64,)) for k in range(6)]
    candidates = [Candidate(2, 32), Candidate(3, 32), Candidate(4, 32), Candidate(16, -1)]
    cost = np.array([[2.0, 3.0, 4.0, 16.0]] * 6) * 512
    # units 0-2 care much about their width, units 3-5 hardly
    table = [[1.0, 0.3, 0.1, 0.0]] * 3 + [[0.05, 0.04, 0.03, 0.0]] * 3
    errors = {}  # no output errors: the integer program's start knows nothing, the search must find it
    opts = SelectOptions(generations=20, offspring=6, samples=2, screen=1)
    seen = []

    def confirm(chs):  # other windows: the same losses, except that they dislike the search's choice if rejected
        seen.append([list(c) for c in chs])
        kls = [sum(table[k][c] for k, c in enumerate(ch)) for ch in chs]
        if rejected == "noise":  # per window: the search's choice swings ±1.0 about its mean, the others steady
            return [[kl + (j % 2 * 2 - 1) * (ch == seen[0][-1]) for j in range(8)] for kl, ch in zip(kls, chs)]
        return kls[:-1] + [10.0] if rejected else kls

    sel = select(units, candidates, cost, 3.0 * 512 * 6, errors, AddedUp(table), opts=opts, confirm=confirm,
                 progress=False)
    uniform = {r["label"]: r["kl"] for r in sel.uniform}
    assert set(uniform) == {"w2g32", "w3g32"} and uniform["w3g32"] == pytest.approx(sum(t[1] for t in table))
    assert sel.bpw <= 3.0 + 1e-9
    assert len(seen) == 1 and [0] * 6 in seen[0] and [1] * 6 in seen[0]  # every uniform scheme that fits, once
    final = sel.search["final"]
    assert final["scored"][-1]["label"] == "search"  # the search's choice last
    assert final["windows"] == "confirmation"
    assert sel.kl == min(r["kl"] for r in final["scored"] if rejected != "noise" or r["label"] in uniform)
    assert all(sel.kl <= u + 1e-12 for u in uniform.values())  # never worse than uniform there
    if rejected == "noise":  # lower on average, but not beyond the windows' noise: the best uniform one is kept
        assert final["chosen"] == "w3g32" and sel.choice == [1] * 6 and final["scored"][-1]["kl"] < sel.kl
        assert 0 < final["scored"][-1]["margin"] < 2
    elif rejected:  # the confirmation windows disagreed with the search: the best start is kept
        assert final["chosen"] != "search" and sel.choice in seen[0][:-1]
    else:  # the sensitive units wider than the rest
        assert final["chosen"] == "search" and sel.choice == seen[0][-1]
        assert sel.kl < uniform["w3g32"] and min(sel.choice[:3]) >= max(sel.choice[3:])


def _selected(budget: float, generations: int = 3, seed: int = 0):
    """The recipe on a tiny random Llama (in memory), with its fp copy and the windows it used."""
    from calibration.select import SelectOptions, SelectRun, select_model
    from quant.arch import get_arch
    from quant.config import QuantConfig

    fp = build_tiny("llama")
    model = copy.deepcopy(fp)
    arch = get_arch("llama")
    # each generation draws 4 of a pool of 7; laid out as selection_windows does: 4 of the pool, the 4 confirmation
    # windows, the other 3 of the pool
    opts = SelectOptions(generations=generations, offspring=4, samples=4, seqlen=32, screen=1, top_k=32, confirm=4,
                         pool=7)
    calib, select = windows(8, 32, seed), windows(11, 32, seed + 100)
    report, config, rec = select_model(model, arch, QuantConfig(bits=3, group_size=32), calib, select,
                                       torch.device("cpu"), SelectRun(budget, None), opts, progress=False)
    return fp, model, arch, report, config, rec, calib, select


@pytest.mark.parametrize("budget", [2.7, 3.25])
def test_never_worse_than_uniform_and_the_written_model_is_the_scored_one(budget):
    from quant.qlinear import QuantLinear

    _, model, _, report, config, rec, _, _ = _selected(budget)
    assert report.bpw <= budget + 1e-9 and rec["bpw"] == pytest.approx(report.bpw)
    assert rec["uniform"] and all(rec["kl"] <= u["kl"] + 1e-12 for u in rec["uniform"])
    assert {h.get("windows") for h in rec["search"]["history"][1:]} <= set(range(3))  # drawn afresh
    assert rec["search"]["final"]["windows"] == "confirmation"
    assert [r["label"] for r in rec["search"]["starts"]][-1] == "ILP on calibrated errors"
    assert rec["measured_kl"] == pytest.approx(rec["kl"], rel=1e-5, abs=1e-9)  # re-measured on the model as written
    for name, label in rec["units"].items():
        for m in [n for n, _ in model.named_modules() if n.startswith(name.rpartition(".")[0] + ".")]:
            mod = model.get_submodule(m)
            if isinstance(mod, QuantLinear) and m.rpartition(".")[2].removesuffix("_proj") in name.rpartition(".")[2]:
                assert label == f"w{mod.bits}g{mod.group_size}", m
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    assert set(config.overrides) and all(v["bits"] in (2, 3, 4, 8, 16) for v in config.overrides.values())


def test_the_stitched_anchor_is_uniform_gptq():
    """At the budget of uniform w3g32 the database's inputs come from uniform w3g32, so its uniform
    configuration scores exactly what `quantize --bits 3` builds."""
    from calibration.search import KLScore
    from calibration.select import written_kl
    from quant.config import QuantConfig
    from quant.pipeline import quantize_model

    from quant.arch import get_arch

    fp = build_tiny("llama")
    arch = get_arch("llama")
    uniform = copy.deepcopy(fp)
    calib = windows(8, 32, 0)
    report = quantize_model(uniform, arch, calib, QuantConfig(bits=3, group_size=32), torch.device("cpu"), progress=False)
    _, _, _, _, _, rec, _, select = _selected(report.bpw, generations=1)
    confirmation = select[4:8]  # where the last choice is made
    score = KLScore(fp, arch, confirmation, torch.device("cpu"), 32)
    w3 = [u for u in rec["uniform"] if u["label"] == "w3g32"]
    assert len(w3) == 1
    assert rec["start"] == "w3g32" and not [r for r in rec["search"]["starts"] if r["label"].startswith("ILP")]
    assert w3[0]["kl"] == pytest.approx(written_kl(uniform, arch, confirmation, torch.device("cpu"), score), rel=1e-5)


def test_the_default_budget_run(tiny_model_dir, text_file, tmp_path, capsys):
    from quant.loading import load_quantized

    out = tmp_path / "mixed"
    assert run("quantize", "--model", tiny_model_dir, "--calib", text_file, *COMMON, *SEARCH, "--budget", 3.0,
               "--out", out) == 0
    printed = capsys.readouterr().out
    assert "KL-scored selection" in printed and "chosen, as written" in printed and "uniform w2g32" in printed
    a = json.loads((out / "hmq.json").read_text())["allocation"]
    assert a["recipe"] == "select" and a["objective"] == "kl" and a["bpw"] <= 3.0 + 1e-9
    assert not (tmp_path / "mixed.sens").exists() and not (tmp_path / "mixed.select.partial").exists()
    assert run("inspect", out, "--json") == 0
    assert json.loads(capsys.readouterr().out)["bpw"] == pytest.approx(a["bpw"])
    model = load_quantized(out)
    bits = {n: m.bits for n, m in model.named_modules() if hasattr(m, "bits")}
    assert set(bits.values()) == {int(label[1]) for label in a["units"].values() if label != "fp16"}


def test_presets_and_bad_input(tiny_model_dir, text_file, tmp_path, capsys):
    import cli
    from calibration.select import SelectOptions
    from quant.config import load_yaml

    assert SelectOptions(**load_yaml(CONFIGS / "mixed-default.yaml")["selection"]) == SelectOptions()
    args = cli.build_parser().parse_args(["quantize", "--config", str(CONFIGS / "mixed-fast.yaml"), "--budget", "3",
                                          "--search-screen", "2"])
    run_settings, _, _ = cli.resolve_settings(args)
    opts = cli._select_options(args, run_settings, cli._budget_options(args))
    assert opts.generations == 6 and opts.screen == 2  # the preset, and the flag over it
    assert cli._select_options(args := cli.build_parser().parse_args(["quantize", "--budget", "3", "--recipe", "measure"]),
                               cli.resolve_settings(args)[0], cli._budget_options(args)) is None
    for extra, message in ((["--budget", 1.0], "raise it to at least --budget"),
                           (["--budget", 3.0, "--candidates", "2,3g-1"], "--recipe measure"),
                           (["--budget", 3.0, "--search-screen", 9], "--search-screen ≤ --search-samples")):
        assert run("quantize", "--model", tiny_model_dir, "--calib", text_file, *COMMON, *extra,
                   "--out", tmp_path / "no") == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert not (tmp_path / "no").exists()


def test_a_killed_selection_resumes_to_the_same_checkpoint(deep_model_dir, text_file, tmp_path, monkeypatch):
    import calibration.select
    import quant.search

    args = ["quantize", "--model", deep_model_dir, "--calib", text_file, *COMMON, *SEARCH, "--budget", 3.0]
    assert run(*args, "--out", tmp_path / "whole") == 0
    real = quant.search.evolve
    monkeypatch.setattr(calibration.select, "evolve", lambda *a, checkpoint=None, **k: real(
        *a, checkpoint=_dying(checkpoint), **k))
    with pytest.raises(Killed):
        run(*args, "--out", tmp_path / "resumed")
    monkeypatch.setattr(calibration.select, "evolve", real)
    assert (tmp_path / "resumed.select.partial").is_dir()
    assert run(*args, "--out", tmp_path / "resumed") == 0
    digests = [json.loads((tmp_path / k / "hmq.json").read_text())["shard_sha256"] for k in ("whole", "resumed")]
    assert digests[0] == digests[1]


def _dying(checkpoint):
    """``checkpoint`` that dies (as a kill would) once the second generation is saved."""
    def save(state):
        checkpoint(state)
        if state["generation"] == 2:
            raise Killed()
    return save


def test_a_mixed_choice_must_beat_the_best_uniform_one_beyond_the_windows_noise():
    import numpy as np

    from calibration.select import final_pick

    rng = np.random.default_rng(0)
    uniform = rng.uniform(0.3, 0.5, 24)  # per-window KL of the best uniform scheme
    worse = uniform + 0.05  # another uniform scheme
    swing = np.tile([1.0, -1.0], 12)  # zero mean
    noisy = uniform - 0.004 + 0.03 * swing  # lower on average by 0.65 standard errors: inside the noise
    steady = uniform - 0.004 + 0.001 * swing  # as much lower, on every window (20 standard errors)
    flags = [True, True, False]
    for mixed, want in [(noisy, 1), (steady, 2)]:
        each = [list(worse), list(uniform), list(mixed)]
        kls = [float(np.mean(e)) for e in each]
        assert kls[2] < kls[1] < kls[0]
        pick, margins = final_pick(kls, each, flags, 2.0)
        assert pick == want and margins[:2] == [None, None]
        d = uniform - mixed
        assert margins[2] == pytest.approx(d.mean() / (d.std(ddof=1) / np.sqrt(24)))
        # margin 0: any lower mean; no per-window values: the lowest, as before
        assert final_pick(kls, each, flags, 0.0)[0] == 2
        assert final_pick(kls, [None] * 3, flags, 2.0)[0] == 2
    # a mixed choice above the best uniform one is never written, whatever the margin
    each = [list(uniform), list(uniform + 0.01)]
    assert final_pick([float(np.mean(e)) for e in each], each, [True, False], 0.0)[0] == 0


def test_the_paired_gain_of_two_models_on_the_same_windows():
    import numpy as np

    from calibration.select import paired_gain

    base = [0.50, 0.40, 0.60, 0.30]
    other = [0.45, 0.38, 0.50, 0.31]  # differences 0.05, 0.02, 0.10, -0.01
    gain, se, t = paired_gain(base, other)
    d = np.array([0.05, 0.02, 0.10, -0.01])
    assert gain == pytest.approx(0.04) and se == pytest.approx(d.std(ddof=1) / 2) and t == pytest.approx(gain / se)
    assert paired_gain(other, base)[2] == pytest.approx(-t)  # the other way round
    exact = [0.5, 0.25, 0.75, 0.375]  # binary fractions: every difference below is exactly 0.125
    assert paired_gain(exact, [b - 0.125 for b in exact])[2] == 1e9  # the same gain on every window
    assert paired_gain(base, base) == (0.0, 0.0, 0.0)
    assert np.isnan(paired_gain(base, [float("nan")] + other[1:])[2])
    with pytest.raises(ValueError, match="same windows"):
        paired_gain([0.1], [0.1])  # one window
    with pytest.raises(ValueError, match="same windows"):
        paired_gain(base, other[:3])  # other windows


@pytest.mark.parametrize("tokens", [512, 7, 64])  # one block; blocks that split a window; 2 windows a block
def test_the_per_window_kl_averages_to_the_score(tokens, monkeypatch):
    from functools import partial

    import calibration.search
    from calibration.search import KLScore, last_boundary
    from quant.engine import head_blocks
    from quant.arch import get_arch
    from quant.engine import head_on

    fp = build_tiny("llama")
    arch = get_arch("llama")
    quantized = copy.deepcopy(fp)
    with torch.no_grad():
        for p in quantized.model.layers.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ws = windows(5, 32, 3)
    score = KLScore(fp, arch, ws, torch.device("cpu"), 32)
    hidden = last_boundary(quantized, arch, ws, torch.device("cpu"))
    monkeypatch.setattr(calibration.search, "head_blocks", partial(head_blocks, tokens=tokens))
    with torch.no_grad(), head_on(quantized, arch, torch.device("cpu")):
        whole, each = score(hidden, 5), score.each()(hidden, 5)
        first = score.each()(hidden, 2)
    assert len(each) == 5 and len(set(each)) == 5 and min(each) > 0
    assert sum(each) / 5 == pytest.approx(whole, rel=1e-6)
    assert first == pytest.approx(each[:2], rel=1e-6)
    # each window's value is that window's own mean KL
    alone = KLScore(fp, arch, ws[3:4], torch.device("cpu"), 32)
    with torch.no_grad(), head_on(quantized, arch, torch.device("cpu")):
        assert alone(hidden[3:4], 1) == pytest.approx(each[3], rel=1e-5)
