"""Mixed precision through the ``hmq`` command on a tiny local model: measure once, quantize under
each kind of budget, refuse what cannot work, and draw the frontier."""
import json

import pytest

import cli

from .conftest import build_tiny


def run(*argv):
    return cli.main([str(a) for a in argv])


COMMON = ["--nsamples", 4, "--seqlen", 32, "--group-size", 32, "--no-progress"]
MEASURE = ["--loss-samples", 2, "--loss-seqlen", 32, "--probes", 4, "--candidates", "2,3,4,8"]


@pytest.fixture(scope="module")
def sens_file(tiny_model_dir, text_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("sens") / "tiny.sens"
    assert run("measure", "--model", tiny_model_dir, "--calib", text_file, *COMMON, *MEASURE, "--out", path) == 0
    return path


def test_measure_writes_a_reusable_file(sens_file, capsys):
    data = json.loads(sens_file.read_text())
    assert data["format"] == "hmq-sensitivity/1" and len(data["units"]) == 8
    assert [c["bits"] for c in data["candidates"]] == [2, 3, 4, 8, 16]
    assert data["settings"]["pair_bits"] == 3 and len(data["pairs"]) == 6 + 6 + 16


@pytest.mark.parametrize("budget", [2.75, 3.0, 4.25])
def test_quantize_under_a_bpw_budget(sens_file, tiny_model_dir, text_file, tmp_path, capsys, budget):
    out = tmp_path / "mixed"
    assert run("quantize", "--model", tiny_model_dir, "--calib", text_file, *COMMON, "--sensitivity", sens_file,
               "--budget", budget, "--out", out) == 0
    summary = capsys.readouterr().out
    assert "mixed precision (hessian)" in summary and "Optimal" in summary
    assert run("inspect", out, "--json") == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["bpw"] <= budget + 1e-9  # the real checkpoint, not the plan, is within budget
    meta = json.loads((out / "hmq.json").read_text())
    assert meta["allocation"]["bpw"] == pytest.approx(rep["bpw"])
    bits = {name: m["bits"] for name, m in rep["modules"].items()}
    for layer in (0, 1):  # fused groups share a width
        p = f"model.layers.{layer}."
        assert len({bits[p + f"self_attn.{x}_proj"] for x in "qkv"}) == 1
        assert bits[p + "mlp.gate_proj"] == bits[p + "mlp.up_proj"]


def test_budget_gb_counts_the_whole_checkpoint(sens_file, tiny_model_dir, text_file, tmp_path, capsys):
    sens = json.loads(sens_file.read_text())
    gb = (sens["overhead_bytes"] + 3.2 * sum(u["in_features"] * u["out_features"] for u in sens["units"]) / 8) / 1e9
    out = tmp_path / "gb"
    assert run("quantize", "--model", tiny_model_dir, "--calib", text_file, *COMMON, "--sensitivity", sens_file,
               "--budget-gb", gb, "--out", out) == 0
    capsys.readouterr()
    assert run("inspect", out, "--json") == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["bytes"] + sens["overhead_bytes"] <= gb * 1e9


def test_infeasible_budget_and_wrong_model_are_clear(sens_file, tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "x"
    assert run("quantize", "--model", tiny_model_dir, "--calib", text_file, *COMMON, "--sensitivity", sens_file,
               "--budget", 1.5, "--out", out) == 2
    err = capsys.readouterr().err
    assert "hmq: error:" in err and "raise the budget to at least 2.563 bits per weight" in err and "Traceback" not in err
    assert not out.exists()
    other = tmp_path / "other-model"
    build_tiny("llama", seed=3).save_pretrained(other)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    assert run("quantize", "--model", other, "--calib", text_file, *COMMON, "--sensitivity", sens_file,
               "--budget", 3, "--out", out) == 2
    assert "not on this model" in capsys.readouterr().err
    assert run("quantize", "--model", tiny_model_dir, "--calib", text_file, *COMMON, "--sensitivity", sens_file,
               "--budget", 3, "--budget-gb", 1, "--out", out) == 2
    assert "not several" in capsys.readouterr().err


def test_budget_without_sensitivity_measures_and_keeps_it(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "auto"
    assert run("quantize", "--model", tiny_model_dir, "--calib", text_file, *COMMON, *MEASURE, "--recipe", "measure", "--objective", "output",
               "--budget", 3.5, "--out", out) == 0
    assert (tmp_path / "auto.sens").is_file() and (out / "model.safetensors").is_file()


def test_max_ppl_increase_bisects(sens_file, tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "bisect"
    assert run("quantize", "--model", tiny_model_dir, "--calib", text_file, *COMMON, "--sensitivity", sens_file,
               "--max-ppl-increase", "50%", "--bisect-steps", 2, "--eval-windows", 1, "--eval-seqlen", 64, "--out", out) == 0
    meta = json.loads((out / "hmq.json").read_text())["allocation"]
    steps = meta["bisection"]
    assert len(steps) == 3
    passing = [s for s in steps if s["ppl"] <= meta["target_ppl"]]
    assert passing and meta["bpw"] <= min(s["budget"] for s in passing) + 1e-9


def test_frontier_writes_json_and_png(sens_file, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "front"
    assert run("frontier", "--model", tiny_model_dir, "--sensitivity", sens_file, "--verify", 1, "--uniform-bits", "4",
               "--eval-windows", 1, "--eval-seqlen", 64, "--nsamples", 4, "--seqlen", 32, "--out", out, "--no-progress") == 0
    data = json.loads((out / "frontier.json").read_text())
    pred = data["predicted"]
    assert len(pred) >= 2 and all(b["bpw"] > a["bpw"] and b["predicted_dloss"] < a["predicted_dloss"]
                                  for a, b in zip(pred, pred[1:]))
    assert len(data["verified"]) == 1 and {u["method"] for u in data["uniform"]} == {"rtn", "gptq"}
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_linear_units_may_split_fused_groups(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "linear"
    assert run("quantize", "--model", tiny_model_dir, "--calib", text_file, *COMMON, *MEASURE, "--recipe", "measure", "--units", "linear", "--engine", "hmq",
               "--pair-bits", 0, "--budget", 3.0, "--out", out) == 0
    sens = json.loads((tmp_path / "linear.sens").read_text())
    assert len(sens["units"]) == 14 and sens["pairs"] == []
    capsys.readouterr()
    assert run("inspect", out, "--json") == 0
    assert json.loads(capsys.readouterr().out)["bpw"] <= 3.0


def test_latency_budget(sens_file, tiny_model_dir, text_file, tmp_path, capsys):
    """A latency table where 8-bit is as fast as fp16 and 2-bit is slowest (as on a CPU that
    dequantizes): the allocation must respect the latency budget, whatever the bytes."""
    table = {"128x64": {"w2g32": 9.0, "w3g32": 8.0, "w4g32": 4.0, "w8g32": 2.0, "fp16": 2.0},
             "64x64": {"w2g32": 9.0, "w3g32": 8.0, "w4g32": 4.0, "w8g32": 2.0, "fp16": 2.0},
             "256x64": {"w2g32": 9.0, "w3g32": 8.0, "w4g32": 4.0, "w8g32": 2.0, "fp16": 2.0},
             "64x128": {"w2g32": 9.0, "w3g32": 8.0, "w4g32": 4.0, "w8g32": 2.0, "fp16": 2.0}}
    path = tmp_path / "lat.json"
    path.write_text(json.dumps(table))
    out = tmp_path / "lat"
    assert run("quantize", "--model", tiny_model_dir, "--calib", text_file, *COMMON, "--sensitivity", sens_file,
               "--latency-table", path, "--budget-latency", 8 * 4.0, "--out", out) == 0
    alloc = json.loads((out / "hmq.json").read_text())["allocation"]
    latency = sum(table["128x64"][label] for label in alloc["units"].values())  # same row in every shape
    assert alloc["cost"] == pytest.approx(latency) and latency <= 32.0
    assert list(alloc["units"].values()).count("w2g32") + list(alloc["units"].values()).count("w3g32") <= 2
    assert run("quantize", "--model", tiny_model_dir, "--calib", text_file, *COMMON, "--sensitivity", sens_file,
               "--latency-table", path, "--budget-latency", 10, "--out", tmp_path / "y") == 2
    assert "below the fastest configuration the table allows, 16" in capsys.readouterr().err
    path.write_text(json.dumps({"1x1": {}}))
    assert run("quantize", "--model", tiny_model_dir, "--calib", text_file, *COMMON, "--sensitivity", sens_file,
               "--latency-table", path, "--budget-latency", 100, "--out", tmp_path / "z") == 2
    assert "no entry for unit shape(s)" in capsys.readouterr().err


def test_candidates_with_their_own_group_size(tiny_model_dir, text_file, tmp_path, capsys):
    """`--candidates 3,3g-1,4`: a per-channel 3-bit candidate beside g32; the allocation may mix
    group sizes, and the checkpoint carries each module's own group size."""
    out = tmp_path / "groups"
    cands = "3,3g-1,4"
    # 3.45 bpw: w3g32 (3.59 bits a weight here) and w4g32 (4.63) each cost more than the budget, so any
    # allocation that fits puts w3g-1 (3.15-3.30) somewhere
    assert run("quantize", "--model", tiny_model_dir, "--calib", text_file, *COMMON, *MEASURE[:-2], "--recipe", "measure", "--candidates", cands,
               "--budget", 3.45, "--out", out) == 0
    sens = json.loads((tmp_path / "groups.sens").read_text())
    assert [(c["bits"], c["group_size"]) for c in sens["candidates"]] == [(3, 32), (3, -1), (4, 32), (16, -1)]
    cost = [row[0:2] for row in sens["cost"]]
    assert all(ch < g for g, ch in cost)  # one scale per row is cheaper than one per 32 columns
    assert len(sens["single_all"][0]) == 4 and sens["single_all"][0][1] is not None
    meta = json.loads((out / "hmq.json").read_text())
    chosen = meta["allocation"]["units"]
    capsys.readouterr()
    assert run("inspect", out, "--json") == 0
    rep = json.loads(capsys.readouterr().out)
    members = {u["name"]: u["members"] for u in sens["units"]}
    assert {lab for lab in chosen.values()} >= {"w3g-1"}
    for unit, label in chosen.items():
        for m in members[unit]:
            got = rep["modules"][m]
            assert (label == "fp16" and got["bits"] == 16) or label == f"w{got['bits']}g{got['group_size']}", m
    assert rep["bpw"] <= 3.45 + 1e-9
    assert run("measure", "--model", tiny_model_dir, "--calib", text_file, *COMMON, *MEASURE[:-2],
               "--candidates", "3gx", "--out", tmp_path / "bad.sens") == 2
    assert "candidate '3gx' is not a bit width" in capsys.readouterr().err


def test_taylor_context_measurement_and_gain_scale(tiny_model_dir, text_file, tmp_path, capsys):
    """`hmq measure --context-bits 3 --context-method taylor`: one pass per unit at the fp weights,
    the other candidates predicted; `quantize --objective context --gain-scale S` allocates on it,
    and a scale outside (0, 1] is refused with the flag's name."""
    path = tmp_path / "taylor.sens"
    assert run("measure", "--model", tiny_model_dir, "--calib", text_file, *COMMON, *MEASURE, "--pair-bits", 0,
               "--single-bits", 3, "--context-bits", 3, "--context-method", "taylor", "--out", path) == 0
    sens = json.loads(path.read_text())
    assert sens["settings"]["context_method"] == "taylor" and sens["settings"]["context_exact_bits"] == [16]
    for exact, pred in zip(sens["context_exact"], sens["context_single"]):
        assert exact[-1] is not None and exact[0] is None and pred[0] is not None  # fp measured, w2 predicted
    out = tmp_path / "ctx"
    assert run("quantize", "--model", tiny_model_dir, "--calib", text_file, *COMMON, "--sensitivity", path,
               "--objective", "context", "--gain-scale", 0.7, "--budget", 3.5, "--out", out) == 0
    assert "mixed precision (context)" in capsys.readouterr().out
    assert json.loads((out / "hmq.json").read_text())["allocation"]["bpw"] <= 3.5 + 1e-9
    assert run("quantize", "--model", tiny_model_dir, "--calib", text_file, *COMMON, "--sensitivity", path,
               "--objective", "context", "--gain-scale", 1.5, "--budget", 3.5, "--out", tmp_path / "bad") == 2
    assert "--gain-scale 1.5 must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_search_refines_the_allocation_within_budget(sens_file, tiny_model_dir, text_file, tmp_path, capsys):
    """--search: the checkpoint stays within the budget, the record says what the search did, and
    its calibration loss is never worse than the ILP's start."""
    out = tmp_path / "searched"
    assert run("quantize", "--model", tiny_model_dir, "--calib", text_file, *COMMON, "--sensitivity", sens_file,
               "--budget", 3.0, "--search", 3, "--search-samples", 2, "--search-seqlen", 32, "--search-offspring", 3,
               "--out", out) == 0
    summary = capsys.readouterr().out
    assert "search: calibration loss" in summary
    assert run("inspect", out, "--json") == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["bpw"] <= 3.0 + 1e-9
    a = json.loads((out / "hmq.json").read_text())["allocation"]
    assert a["bpw"] == pytest.approx(rep["bpw"]) and a["status"].startswith("searched")
    s = a["search"]
    assert s["score"] <= s["start_score"] and s["evaluations"]["full"] >= 1 and s["evaluations"]["screen"] >= 3
    assert run("quantize", "--model", tiny_model_dir, "--calib", text_file, *COMMON, "--search", 3,
               "--out", tmp_path / "x") == 2
    assert "--search refines" in capsys.readouterr().err


@pytest.mark.parametrize("setting,measured", [("clip", True), ("clip", False), ("act-order", False)])
def test_solver_settings_follow_the_measurement_unless_overridden(tiny_model_dir, text_file, tmp_path, capsys,
                                                                  setting, measured):
    """Range search and column order: quantize --sensitivity solves as the measurement did (a file
    measured without act-order, as every file before it was the default, gets no act-order and no
    static groups), unless told otherwise, and then warns."""
    key = setting.replace("-", "_")
    sens = tmp_path / "m.sens"
    flag, other = (f"--{setting}", f"--no-{setting}") if measured else (f"--no-{setting}", f"--{setting}")
    assert run("measure", "--model", tiny_model_dir, "--calib", text_file, *COMMON, *MEASURE, "--pair-bits", 0,
               flag, "--out", sens) == 0
    settings = json.loads(sens.read_text())["settings"]
    assert settings[key] is measured and settings["static_groups"] is (settings["act_order"] and True)
    mismatch = (f"measured {'with' if measured else 'without'} --{setting} but this run quantizes "
                f"{'without' if measured else 'with'} it")
    for extra, want in (([], measured), ([other], not measured)):
        out = tmp_path / f"q{len(extra)}"
        capsys.readouterr()
        assert run("quantize", "--model", tiny_model_dir, "--calib", text_file, *COMMON, "--sensitivity", sens,
                   "--budget", 3.0, "--out", out, *extra) == 0
        qc = json.loads((out / "hmq.json").read_text())["quant_config"]
        assert qc[key] is want
        if key == "act_order":
            assert qc["static_groups"] is want  # static groups are on by default, and mean nothing without the order
        assert (mismatch in capsys.readouterr().err) is (want != measured)


def test_only_candidates_the_engine_runs_are_measured(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """`--format compressed-tensors` (vLLM runs it at 4/8 bits): with the default candidates the run
    measures 4 and 8 only and lands; a list with 2 or 3 bits, or --units linear, is refused before any
    loading or measuring."""
    import calibration.measure

    measured = []
    real = calibration.measure.measure_sensitivity
    monkeypatch.setattr(calibration.measure, "measure_sensitivity",
                        lambda *a, **k: measured.append([c.label for c in a[4]]) or real(*a, **k))
    out = tmp_path / "ct"
    assert run("quantize", "--model", tiny_model_dir, "--calib", text_file, *COMMON, *MEASURE[:-2], "--recipe", "measure", "--budget", 6,
               "--format", "compressed-tensors", "--out", out) == 0
    assert measured == [["w4g32", "w8g32", "fp16"]]
    sens = json.loads((tmp_path / "ct.sens").read_text())
    assert sens["settings"]["pair_bits"] == 4
    assert {m["bits"] for m in json.loads((out / "hmq.json").read_text())["modules"].values() if m} <= {4, 8}
    for extra in (["--candidates", "3,4"], ["--units", "linear"]):
        assert run("quantize", "--model", tiny_model_dir, "--calib", text_file, *COMMON, *MEASURE[:-2], "--recipe", "measure", *extra,
                   "--budget", 6, "--format", "compressed-tensors", "--out", tmp_path / "no") == 2
    assert len(measured) == 1 and not (tmp_path / "no").exists()
