"""hmq's default GPTQ against llm-compressor's on identical windows (the short form of
bench/peers.py). Slow: it runs both tools on the real SmolLM2, and needs an environment with
llmcompressor, named by HMQ_LLMCOMPRESSOR_PYTHON (see bench/peer_llmcompressor.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_scheme_labels_round_trip():
    import common
    from quant.config import ModuleSpec

    for spec in (ModuleSpec(3, 64), ModuleSpec(4, -1, True), ModuleSpec(2, 128)):
        assert common.parse_scheme(common.scheme_label(spec)) == spec
    with pytest.raises(SystemExit, match="must look like"):
        common.parse_scheme("3g64")


def test_the_mixed_rows_reporting_kl_against_uniform_paired_per_window():
    from default_mixed import reporting_gain

    uniform = {"window_kl": [0.40, 0.50, 0.45, 0.55]}
    lower = {"window_kl": [0.38, 0.49, 0.42, 0.54]}  # lower on every window: differences -0.02, -0.01, -0.03, -0.01
    line = reporting_gain(lower, uniform)
    assert line.startswith("-0.0175 ± 0.0048 (-3.7 se)")
    assert reporting_gain(uniform, lower).startswith("+0.0175 ± 0.0048 (+3.7 se)")
    assert reporting_gain({"kl": 0.4}, uniform) == ""  # a row of an older run, with no per-window values



def test_the_peer_verdict_pairs_every_window_of_the_shared_seeds():
    from uniform_table import verdict

    def row(tool, seed, nll, kl):
        return {"tool": tool, "seed": seed, "ppl": 2.718281828 ** (sum(nll) / len(nll)), "kl": sum(kl) / len(kl),
                "window_nll": nll, "window_kl": kl}

    # hmq higher in mean perplexity by a hair (differences +0.01, -0.01, +0.02, -0.01 over two seeds' windows)
    # and lower in KL on every window: a split, with the higher side under 2 se
    rows = {("m", "w8", "hmq", 0): row("hmq", 0, [3.01, 2.99], [0.010, 0.020]),
            ("m", "w8", "hmq", 1): row("hmq", 1, [3.02, 2.99], [0.010, 0.030]),
            ("m", "w8", "llm-compressor", 0): row("llm-compressor", 0, [3.00, 3.00], [0.020, 0.030]),
            ("m", "w8", "llm-compressor", 1): row("llm-compressor", 1, [3.00, 3.00], [0.030, 0.035])}
    line = verdict("m", "w8", rows)
    assert "**split**" in line
    assert "log-perplexity +0.00250 ± 0.00750 (+0.3 se)" in line, line
    assert "KL -0.01125 ± 0.00315 (-3.6 se)" in line, line
    assert line.endswith("inside the noise (under 2 se)")
    # an older run without per-window values: the mean verdict alone
    del rows[("m", "w8", "hmq", 1)]["window_nll"]
    assert "paired" not in verdict("m", "w8", rows)
    # hmq higher by a little more than 2 se (differences +0.01, +0.03, 0, +0.02): no such remark
    far = {k: dict(r) for k, r in rows.items()}
    far[("m", "w8", "hmq", 0)]["window_nll"] = [3.01, 3.03]
    far[("m", "w8", "hmq", 1)]["window_nll"] = [3.00, 3.02]
    far[("m", "w8", "hmq", 0)]["ppl"] = far[("m", "w8", "hmq", 1)]["ppl"] = 30.0
    line = verdict("m", "w8", far)
    assert "log-perplexity +0.01500 ± 0.00645 (+2.3 se)" in line, line
    assert "noise" not in line
def test_peer_weights_load_into_a_copy_and_are_checked(tmp_path):
    import torch
    from peers import load_weights
    from safetensors.torch import save_file

    from .conftest import build_tiny

    base = build_tiny("llama")
    name = "model.layers.0.mlp.down_proj.weight"
    new = torch.zeros_like(base.get_submodule(name.removesuffix(".weight")).weight)
    save_file({name: new}, tmp_path / "w.safetensors")
    model = load_weights(base, tmp_path / "w.safetensors")
    assert torch.equal(model.get_submodule(name.removesuffix(".weight")).weight, new)
    assert not torch.equal(base.get_submodule(name.removesuffix(".weight")).weight, new)  # the base is untouched
    save_file({name: new[:, :3].contiguous()}, tmp_path / "bad.safetensors")
    with pytest.raises(SystemExit, match="has shape"):
        load_weights(base, tmp_path / "bad.safetensors")


def test_the_uniform_frontier_and_a_mixed_point_against_it(tmp_path):
    import math

    from frontier import closed, gather, on_frontier, pareto

    pts = [{"scheme": "d", "bpw": 4.0, "ppl": 40.0}, {"scheme": "bs", "bpw": 3.0, "ppl": 60.0},
           {"scheme": "a", "bpw": 2.0, "ppl": 100.0}, {"scheme": "c", "bpw": 3.5, "ppl": 55.0},
           {"scheme": "b", "bpw": 3.0, "ppl": 50.0}]
    front = pareto(pts)
    assert [p["scheme"] for p in front] == ["a", "b", "d"]  # a dearer, worse scheme is off the frontier
    assert on_frontier(front, 2.5) == pytest.approx(math.sqrt(100 * 50))  # log-linear between neighbours
    assert on_frontier(front, 3.0) == pytest.approx(50.0) and on_frontier(front, 4.0) == pytest.approx(40.0)
    assert math.isnan(on_frontier(front, 1.5)) and math.isnan(on_frontier(front, 4.5))
    assert closed(40.0, 50.0, 30.0) == pytest.approx(0.5) and closed(60.0, 50.0, 30.0) < 0

    def result(name, fp, rows):
        path = tmp_path / name
        path.write_text(json.dumps({"fp": {"ppl": fp}, "rows": rows}))
        return str(path)

    old = result("old.json", 30.0, [{"tool": "hmq", "scheme": "w3g64", "seed": 0, "ppl": 50.0, "kl": 0.5}])
    new = result("new.json", 30.0, [{"tool": "hmq uniform", "scheme": "w3g64", "seed": 0, "ppl": 49.0, "kl": 0.4,
                                     "bpw": 3.3},
                                    {"tool": "hmq select", "scheme": "mixed@3.0", "seed": 0, "ppl": 45.0, "kl": 0.3,
                                     "bpw": 3.0}])
    fp, uniform, mixed = gather([old, new])
    assert fp == 30.0 and uniform["w3g64"][0]["ppl"] == 49.0  # the later file wins
    assert list(mixed) == ["mixed@3.0"]
    fp, uniform, _ = gather([new, old])
    assert uniform["w3g64"][0]["ppl"] == 50.0 and uniform["w3g64"][0]["bpw"] is None  # no size recorded
    fp, uniform, _ = gather([old, result("more.json", 30.0, [{"tool": "hmq", "scheme": "w3g64", "seed": 1, "ppl": 51.0,
                                                                "kl": 0.5, "bpw": 3.3}])])
    assert uniform["w3g64"][0]["bpw"] == 3.3  # a size missing in one file is the scheme's from another
    with pytest.raises(SystemExit, match="another model"):
        gather([old, result("gemma.json", 37.0, [])])


@pytest.mark.slow
def test_default_gptq_is_no_worse_than_llmcompressor_at_w3g64(tmp_path):
    python = os.environ.get("HMQ_LLMCOMPRESSOR_PYTHON")
    if not python:
        pytest.skip("set HMQ_LLMCOMPRESSOR_PYTHON to the python of an environment with llmcompressor")
    out = tmp_path / "peers.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "peers.py"), "--schemes", "w3g64", "--seeds", "0",
                    "--nsamples", "16", "--windows", "16", "--llmcompressor", python, "--json", str(out)], check=True)
    rows = {r["tool"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["hmq"]["kl"] <= rows["llm-compressor"]["kl"]
    assert rows["hmq"]["ppl"] <= rows["llm-compressor"]["ppl"]
