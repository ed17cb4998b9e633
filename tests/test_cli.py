"""The ``hmq`` command end to end on a tiny local model and text, and every bad input's message."""
import json

import pytest
import torch

import cli

from .conftest import build_tiny


def run(*argv):
    return cli.main([str(a) for a in argv])


def quantize_args(model, text, out, *extra, group_size=32):
    return ["quantize", "--model", model, "--calib", text, "--nsamples", 4, "--seqlen", 32, "--group-size", group_size,
            "--out", out, "--no-progress", *extra]


def test_quantize_inspect_eval(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "w4"
    assert run(*quantize_args(tiny_model_dir, text_file, out, "--bits", 4, "--override", r"layers\.1\.mlp\.down_proj=8")) == 0
    summary = capsys.readouterr().out
    assert "bpw" in summary and str(out) in summary
    assert "columns in Hessian order, static groups (auto" in summary and "range search on" in summary
    assert "range search kept per decoder layer" in summary  # 4 bits: picked per layer (clip_layer auto)
    assert run("inspect", out, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    mods = report["modules"]
    assert len(mods) == 14 and mods["model.layers.1.mlp.down_proj"]["bits"] == 8
    assert mods["model.layers.0.mlp.down_proj"]["bits"] == 4
    # bpw counts codes + fp16 scales + packed zeros: 4 + (16 + 4)/32 for the 4-bit modules
    four = [m for m in mods.values() if m["bits"] == 4]
    assert sum(8 * m["bytes"] for m in four) / sum(m["params"] for m in four) == pytest.approx(4 + 20 / 32)
    res = tmp_path / "ppl.json"
    assert run("eval", "--model", out, "--data", text_file, "--seqlen", 64, "--max-windows", 3, "--baseline",
               "--json", res, "--no-progress") == 0
    data = json.loads(res.read_text())
    assert data["windows"] == 3 and data["tokens"] == 3 * 63 and data["ppl"] > 1
    assert data["baseline"]["ppl"] > 1 and data["baseline"]["model"] == str(tiny_model_dir)
    # --kl runs the source model beside the checkpoint in one sweep: the same two perplexities, and the KL table
    capsys.readouterr()
    assert run("eval", "--model", out, "--data", text_file, "--seqlen", 64, "--max-windows", 3, "--kl",
               "--json", res, "--no-progress") == 0
    printed = capsys.readouterr().out
    paired = json.loads(res.read_text())
    assert paired["ppl"] == pytest.approx(data["ppl"], rel=1e-5)
    assert paired["baseline"]["ppl"] == pytest.approx(data["baseline"]["ppl"], rel=1e-5)
    assert paired["kl"] > 0 and 0 < paired["top1"] <= 1 and paired["kl"] <= paired["kl_max"]
    assert paired["reference_model"] == str(tiny_model_dir) and "p99.9" in printed and "top-1" in printed
    assert run("eval", "--model", out, "--data", text_file, "--seqlen", 64, "--max-windows", 3, "--reference",
               tiny_model_dir, "--json", res, "--no-progress") == 0  # another reference: named as such
    named = json.loads(res.read_text())
    assert "baseline" not in named and named["reference"]["ppl"] == pytest.approx(data["baseline"]["ppl"], rel=1e-5)


def test_preset_file_and_unknown_key(tiny_model_dir, text_file, tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text("method: rtn\nbits: 3\ngroup_size: 32\n")
    assert run(*quantize_args(tiny_model_dir, text_file, tmp_path / "o", "--config", preset)) == 0
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert cfg["bits"] == 3 and cfg["meta"]["hmq_method"] == "rtn"
    preset.write_text("bits: 3\ngroupsize: 32\n")
    assert run(*quantize_args(tiny_model_dir, text_file, tmp_path / "o2", "--config", preset)) == 2
    assert "groupsize" in capsys.readouterr().err and not (tmp_path / "o2").exists()


@pytest.fixture(scope="module")
def bad_dirs(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    root = tmp_path_factory.mktemp("bad")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=64, max_position_embeddings=64))
    neox.save_pretrained(root / "gpt_neox_like")
    nan = build_tiny("llama")
    with torch.no_grad():
        nan.model.layers[0].input_layernorm.weight[0] = float("nan")
    nan.save_pretrained(root / "nan")
    tok.save_pretrained(root / "nan")
    (root / "empty.txt").write_text("\n\n   \n")
    (root / "notamodel").mkdir()
    return root


@pytest.mark.parametrize("case,extra,message", [
    ("bits", ["--bits", 5], "bits=5 is not supported"),
    ("group", None, "group size 48 does not divide in_features=64"),
    ("missing", None, "does not exist"),
    ("notamodel", None, "no config.json"),
    ("arch", None, "architecture 'gpt_neox' is not supported"),
    ("nan", None, "NaN or Inf in the calibration activations entering model.layers.0"),
    ("empty", None, "is empty"),
    ("exists", None, "already exists"),
    ("override", ["--override", "q_proj"], "must look like REGEX=BITS"),
])
def test_bad_input_clear_error_nothing_written(case, extra, message, tiny_model_dir, text_file, bad_dirs, tmp_path, capsys):
    model, text, out = tiny_model_dir, text_file, tmp_path / "out"
    if case == "missing":
        model = tmp_path / "no" / "such-model"
    elif case == "notamodel":
        model = bad_dirs / "notamodel"
    elif case == "arch":
        model = bad_dirs / "gpt_neox_like"
    elif case == "nan":
        model = bad_dirs / "nan"
    elif case == "empty":
        text = bad_dirs / "empty.txt"
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    args = quantize_args(model, text, out, *(extra or []), group_size=48 if case == "group" else 32)
    assert run(*args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    if case == "exists":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_overwrite_replaces_existing_output(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    assert run(*quantize_args(tiny_model_dir, text_file, out, "--method", "rtn")) == 0
    (out / "old.txt").write_text("x")
    assert run(*quantize_args(tiny_model_dir, text_file, out, "--method", "rtn", "--overwrite")) == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert run(*quantize_args(tiny_model_dir, text_file, out, "--method", "rtn", "--overwrite")) != 0
    assert "not one (no hmq.json" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "years of work"


def test_unwritable_outputs_are_refused_before_loading(tiny_model_dir, text_file, tmp_path, capsys, monkeypatch):
    import quant.model_io

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(quant.model_io, "load_model", no_loading)
    blocker = tmp_path / "a-file"  # a path under a file cannot be written, whoever runs the test (root too)
    blocker.write_text("x")
    assert run(*quantize_args(tiny_model_dir, text_file, blocker / "q", "--method", "rtn")) != 0
    assert "not a writable folder" in capsys.readouterr().err
    assert run("measure", "--model", str(tiny_model_dir), "--out", str(blocker / "m.sens")) != 0
    assert "not a writable folder" in capsys.readouterr().err
    assert run("measure", "--model", str(tiny_model_dir), "--out", str(tmp_path)) != 0
    assert "is a folder" in capsys.readouterr().err


def test_clip_layer_off_solves_with_the_row_mix_alone(tiny_model_dir, text_file, tmp_path, capsys):
    assert run(*quantize_args(tiny_model_dir, text_file, tmp_path / "w3", "--bits", 3, "--clip-layer", "off")) == 0
    assert "range search kept per decoder layer" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run(*quantize_args(tiny_model_dir, text_file, tmp_path / "w3b", "--bits", 3, "--clip-layer", "maybe"))
    assert "invalid choice" in capsys.readouterr().err and not (tmp_path / "w3b").exists()


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        run("quantize", "--help")
    text = capsys.readouterr().out
    for flag in ("--model", "--bits", "--group-size", "--method", "--calib", "--nsamples", "--seqlen", "--seed",
                 "--act-order", "--sym", "--damp-percent", "--dtype", "--device", "--out", "--overwrite"):
        assert flag in text


@pytest.mark.parametrize("preset", sorted(p.name for p in (__import__("pathlib").Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_shipped_presets_are_valid(preset):
    from pathlib import Path

    args = cli.build_parser().parse_args(["quantize", "--config", str(Path(__file__).parents[1] / "configs" / preset)])
    run_settings, config, _ = cli.resolve_settings(args)
    assert config.bits in (2, 3, 4, 8) and run_settings["nsamples"] >= 1


def test_calibration_selection_and_reporting_text_are_disjoint(text_file):
    from calibration.data import SPLITS, load_text

    parts = {split: {p.strip() for p in load_text(str(text_file), split)[1].split("\n\n")} - {""} for split in SPLITS}
    assert all(parts.values())
    assert not (parts["calib"] & parts["select"]) and not (parts["calib"] & parts["eval"])
    assert not (parts["select"] & parts["eval"])
    every = {p.strip() for p in text_file.read_text().split("\n\n") if p.strip()}
    assert set().union(*parts.values()) == every  # nothing is dropped
    with pytest.raises(ValueError, match="split must be one of"):
        load_text(str(text_file), "test")


def test_a_users_own_file_is_evaluated_whole(tiny_model_dir, text_file, tmp_path, capsys):
    """`eval --data FILE` reads every paragraph of FILE, not the reporting tenth of it."""
    from calibration.data import load_text, own_text_split
    from transformers import AutoTokenizer

    assert own_text_split(str(text_file), "eval") == "all" and own_text_split(None, "eval") == "eval"
    assert own_text_split(str(text_file), "calib", shared=True) == "calib"
    whole = load_text(str(text_file), "all")[1]
    assert {p.strip() for p in whole.split("\n\n")} == {p.strip() for p in text_file.read_text().split("\n\n") if p.strip()}
    out = tmp_path / "ppl.json"
    assert run("eval", "--model", tiny_model_dir, "--data", text_file, "--seqlen", 32, "--no-progress",
               "--json", out) == 0
    assert "the whole of" in capsys.readouterr().err
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert json.loads(out.read_text())["windows"] == tok(whole, return_tensors="pt").input_ids.numel() // 32


def test_bad_yaml_long_windows_and_unknown_kernel_are_one_line_errors(tiny_model_dir, text_file, tmp_path, capsys,
                                                                     monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("quant:\n  bits: 4\n   group_size: [64\n")
    assert run(*quantize_args(tiny_model_dir, text_file, tmp_path / "q", "--config", bad)) == 2
    assert "is not valid YAML at line" in capsys.readouterr().err
    # the tiny model's context is 256 tokens
    assert run("eval", "--model", tiny_model_dir, "--data", text_file, "--seqlen", 512, "--no-progress") == 2
    assert "exceeds the model's max_position_embeddings=256" in capsys.readouterr().err
    assert run(*quantize_args(tiny_model_dir, text_file, tmp_path / "q", "--method", "rtn")) == 0
    monkeypatch.setenv("HMQ_KERNEL", "nope")
    assert run("eval", "--model", tmp_path / "q", "--data", text_file, "--seqlen", 32, "--no-progress") == 2
    assert "HMQ_KERNEL='nope' is not an available kernel" in capsys.readouterr().err


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tokenizer_dir, text_file, tmp_path, capsys):
    from transformers import AutoTokenizer

    folder = tmp_path / "mismatched"
    build_tiny("llama", vocab_size=128).save_pretrained(folder)  # the test tokenizer's ids go up to 258
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    assert run(*quantize_args(folder, text_file, tmp_path / "q")) == 2
    assert "but the model's vocabulary has 128 entries: the tokenizer does not belong" in capsys.readouterr().err
