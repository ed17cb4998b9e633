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
