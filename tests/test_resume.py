"""Resume after a kill: a quantize run stopped part way and started again ends with the same tensors
as one never stopped; a saved state from other settings is refused, naming the fix."""
import json

import pytest
import torch

from quant import resume
from quant.loading import read_tensors

from .conftest import Killed, build_tiny, run, run_logged

COMMON = ["--nsamples", 4, "--seqlen", 32, "--group-size", 32, "--no-progress"]





def kill_after(monkeypatch, layers: int, where: str = "after"):
    """Make the run die once ``layers`` layers are quantized and saved (``where='before-state'``:
    after the layer's files are written but before ``state.json`` records it); a measurement's saved
    layers do not count."""
    save, atomic_json = resume.LayerState.save, resume._atomic_json
    count = {"n": 0}

    def dying_save(self, i, *a, **k):
        if self.folder.name.endswith(".sens.partial"):
            return save(self, i, *a, **k)
        if where == "before-state" and i == layers:
            def no_state(*_a, **_k):
                raise Killed()

            monkeypatch.setattr(resume, "_atomic_json", no_state)
        save(self, i, *a, **k)
        count["n"] += 1
        if where == "after" and count["n"] == layers:
            raise Killed()

    monkeypatch.setattr(resume.LayerState, "save", dying_save)
    return lambda: (monkeypatch.setattr(resume.LayerState, "save", save),
                    monkeypatch.setattr(resume, "_atomic_json", atomic_json))


def same_tensors(a, b):
    ta, tb = read_tensors(a), read_tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]


@pytest.mark.parametrize("method,where,layers", [("gptq", "after", 2), ("gptq", "before-state", 2),
                                                 ("gptq", "before-state", 0), ("rtn", "after", 2),
                                                 ("affine+gptq", "after", 2)])
def test_killed_quantize_resumes_to_the_same_tensors(deep_model_dir, text_file, tmp_path, monkeypatch, caplog,
                                                     method, where, layers):
    """affine+gptq also carries the fp model's activations from layer to layer, and draws random numbers."""
    args = ["quantize", "--model", deep_model_dir, "--calib", text_file, "--bits", 3, "--method", method, *COMMON,
            *(["--affine-epochs", 1] if method.startswith("affine") else [])]
    assert run(*args, "--out", tmp_path / "whole") == 0
    assert not (tmp_path / "whole.partial").exists()  # removed once the checkpoint is written

    heal = kill_after(monkeypatch, layers, where)
    with pytest.raises(Killed):
        run(*args, "--out", tmp_path / "resumed")
    heal()
    partial = tmp_path / "resumed.partial"
    state = json.loads((partial / "state.json").read_text())
    assert state["done"] == layers and not (tmp_path / "resumed").exists()
    assert run_logged(caplog, *args, "--out", tmp_path / "resumed") == 0
    assert layers == 0 or f"{layers} of 4 decoder layers were already quantized" in caplog.text
    same_tensors(tmp_path / "whole", tmp_path / "resumed")
    assert not partial.exists()


def test_a_state_from_other_settings_is_refused_then_restarted(deep_model_dir, text_file, tmp_path, monkeypatch,
                                                               capsys):
    args = ["quantize", "--model", deep_model_dir, "--calib", text_file, *COMMON, "--out", tmp_path / "q"]
    heal = kill_after(monkeypatch, 1)
    with pytest.raises(Killed):
        run(*args, "--bits", 3)
    heal()
    assert run(*args, "--bits", 4) == 2
    err = capsys.readouterr().err
    assert "other settings (differs in: config)" in err and "--restart" in err and "q.partial" in err
    assert run(*args, "--bits", 4, "--restart") == 0
    assert not (tmp_path / "q.partial").exists()
    assert json.loads((tmp_path / "q" / "hmq.json").read_text())["quant_config"]["bits"] == 4


def test_a_folder_that_is_not_a_state_is_not_touched(tmp_path):
    folder = tmp_path / "x.partial"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep me")
    with pytest.raises(resume.StaleState, match="not an hmq resume folder"):
        resume.LayerState(folder, {"a": 1})
    assert (folder / "mine.txt").read_text() == "keep me"


def test_a_state_with_no_layer_saved_gives_way_to_new_settings(tmp_path):
    first = resume.LayerState(tmp_path / "s", {"a": 1})
    assert first.done == 0 and (tmp_path / "s" / "state.json").is_file()  # recorded before any layer
    second = resume.LayerState(tmp_path / "s", {"a": 2})  # nothing to lose: no refusal
    assert second.done == 0
    assert json.loads((tmp_path / "s" / "state.json").read_text())["settings"]["a"] == 2


def test_state_round_trip_restores_layer_inputs_and_rng(tmp_path):
    from quant.pipeline import QuantLinear
    from quant.quantizer import rtn_quantize
    from quant.config import ModuleSpec

    layer = build_tiny("llama").model.layers[0]
    layer.self_attn.q_proj = QuantLinear.from_quantized(rtn_quantize(layer.self_attn.q_proj.weight, ModuleSpec(4, 32)),
                                                        dtype=torch.float32)
    state = resume.LayerState(tmp_path / "s", {"k": [1, 2]})
    torch.manual_seed(3)
    hidden = [torch.randn(2, 5, 64), torch.randn(1, 5, 64)]
    state.save(0, layer, {"rows": [1]}, {"hidden": hidden})
    expected = torch.rand(4)
    again = resume.LayerState(tmp_path / "s", {"k": [1, 2]})  # settings equal after a JSON round trip
    assert again.done == 1
    streams = again.streams()
    assert all(torch.equal(a, b) for a, b in zip(streams["hidden"], hidden)) and len(streams["hidden"]) == 2
    assert torch.equal(torch.rand(4), expected)  # the random stream goes on as it would have
    fresh = build_tiny("llama", seed=5).model.layers[0]
    assert again.restore(0, fresh) == {"rows": [1]}
    assert isinstance(fresh.self_attn.q_proj, QuantLinear)
    for (n, a), (_, b) in zip(layer.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n


def test_a_killed_budget_run_keeps_its_measurement(deep_model_dir, text_file, tmp_path, monkeypatch, caplog):
    """The measurement (most of a default --budget run) is kept beside the output and used again."""
    args = ["quantize", "--model", deep_model_dir, "--calib", text_file, *COMMON, "--recipe", "measure", "--budget", 3.5, "--loss-samples", 2,
            "--loss-seqlen", 32, "--probes", 2, "--pair-bits", 0]
    assert run(*args, "--out", tmp_path / "whole") == 0
    heal = kill_after(monkeypatch, 3)
    with pytest.raises(Killed):
        run(*args, "--out", tmp_path / "resumed")
    heal()
    assert (tmp_path / "resumed.sens").is_file()
    assert run_logged(caplog, *args, "--out", tmp_path / "resumed") == 0
    assert "measured with the same settings" in caplog.text and "3 of 4 decoder layers" in caplog.text
    assert "using the allocation the first start of this run chose" in caplog.text
    assert "measuring sensitivity" not in caplog.text
    same_tensors(tmp_path / "whole", tmp_path / "resumed")
