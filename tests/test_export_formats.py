"""Deployment checkpoints: the compressed-tensors layout, engine rules, integrity checks, and loading
hmq's checkpoints with the real loaders (compressed-tensors through transformers here; GPTQModel
where it installs, behind the ``gptqmodel`` marker)."""
import copy
import json
import re
import struct

import pytest
import torch

from quant import compressed
from quant.arch import get_arch
from quant.config import ModuleSpec, QuantConfig
from quant.export import CheckpointError, check_engine, quantization_config, save_quantized, spec_from_quantization_config
from quant.loading import load_quantized, read_tensors
from quant.pipeline import quantize_model
from quant.qlinear import QuantLinear
from quant.quantizer import QuantizedWeight

from .conftest import build_tiny, windows

CPU = torch.device("cpu")
# a mixed 2/3/4/8 model with one linear kept in floating point; fused groups share a scheme
MIXED = {r"layers\.0\.self_attn\.[qkv]_proj": {"bits": 2}, r"layers\.0\.mlp\.(gate|up)_proj": {"bits": 3},
         r"layers\.1\.mlp\.down_proj": {"bits": 8}, r"layers\.1\.self_attn\.o_proj": {"bits": 16}}


def random_qw(bits, group_size, sym, out_f=64, in_f=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    gs = in_f if group_size == -1 else group_size
    n_groups = in_f // gs
    mid = 1 << (bits - 1)
    zeros = torch.full((n_groups, out_f), mid) if sym else torch.randint(1, 1 << bits, (n_groups, out_f), generator=g)
    return QuantizedWeight(
        intweight=torch.randint(0, 1 << bits, (out_f, in_f), generator=g).to(torch.uint8),
        scales=(torch.rand(n_groups, out_f, generator=g) * 0.01 + 1e-3).half().float(),
        zeros=zeros.to(torch.int32), g_idx=(torch.arange(in_f) // gs).to(torch.int32),
        bits=bits, group_size=group_size, sym=sym)


@pytest.fixture(scope="module")
def quantized():
    """(uniform 4-bit, mixed) tiny Llamas, symmetric, quantized with GPTQ."""
    models = {}
    for kind, overrides in (("uniform", {}), ("mixed", MIXED)):
        model = build_tiny("llama")
        cfg = QuantConfig(bits=4, group_size=32, sym=True, overrides=overrides)
        quantize_model(model, get_arch("llama"), windows(4, 32), cfg, CPU, progress=False)
        models[kind] = (model, cfg)
    return models


def save(models, kind, path, fmt, engine="hmq", tokenizer=None):
    model, cfg = models[kind]
    return save_quantized(model, tokenizer, path, cfg, save_dtype=torch.float16, fmt=fmt, engine=engine)


X = windows(2, 32, seed=3)


# ---- the layout -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_compressed_tensors_round_trip_is_bit_exact(bits, sym, group_size):
    qw = random_qw(bits, group_size, sym)
    back = compressed.from_compressed_tensors(compressed.to_compressed_tensors(qw, "m"), ModuleSpec(bits, group_size, sym), "m")
    for field in ("intweight", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, field), getattr(qw, field)), field


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_compressed_tensors_own_decompressor_reads_our_tensors(bits, sym):
    """compressed-tensors' PackedQuantizationCompressor (the code transformers and llm-compressor
    use) must rebuild exactly hmq's dequantized weight from what hmq writes."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    qw = random_qw(bits, 32, sym, seed=bits)
    tensors = compressed.to_compressed_tensors(qw, "m", scale_dtype=torch.float32)
    group = compressed.quantization_config({"m": ModuleSpec(bits, 32, sym)}, [], False)["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
    weight = PackedQuantizationCompressor.decompress(tensors, scheme)["weight"]
    assert torch.allclose(weight.float(), qw.dequantize(), rtol=0, atol=1e-6)


def test_compressed_tensors_config_validates_with_the_library(quantized, tmp_path):
    ct = pytest.importorskip("compressed_tensors")
    out = save(quantized, "mixed", tmp_path / "ct", "compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = ct.QuantizationConfig.model_validate(qc)
    assert len(parsed.config_groups) == 4  # w4, w2, w3, w8
    assert "model.layers.1.self_attn.o_proj" in parsed.ignore
    names = list(json.loads((out / "hmq.json").read_text())["modules"])
    specs = compressed.specs_from_config(qc, names)
    assert specs == {n: (None if m is None else ModuleSpec(**m)) for n, m in
                     json.loads((out / "hmq.json").read_text())["modules"].items()}


def test_act_order_groups_are_refused_for_compressed_tensors():
    qw = random_qw(4, 32, False)
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(0))
    qw = QuantizedWeight(qw.intweight, qw.scales, qw.zeros, qw.g_idx[perm].contiguous(), 4, 32, False)
    with pytest.raises(compressed.FormatError, match="act-order.*static-groups"):
        compressed.to_compressed_tensors(qw, "model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_hmq_reloads_either_layout_bit_identically(quantized, tmp_path, fmt):
    model, _ = quantized["mixed"]
    reloaded = load_quantized(save(quantized, "mixed", tmp_path / fmt, fmt))
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            r = reloaded.get_submodule(name)
            assert isinstance(r, QuantLinear) and r.bits == m.bits, name
            for buf in ("qweight", "qzeros", "scales", "g_idx"):
                assert torch.equal(getattr(r, buf), getattr(m, buf)), (name, buf)
    assert not isinstance(reloaded.get_submodule("model.layers.1.self_attn.o_proj"), QuantLinear)
    stored = set(read_tensors(tmp_path / fmt))
    ours, other = (("qweight", "weight_packed") if fmt == "gptq" else ("weight_packed", "qweight"))
    assert f"model.layers.0.mlp.up_proj.{ours}" in stored and not any(k.endswith("." + other) for k in stored)
    assert torch.allclose(reloaded(X).logits, model(X).logits, atol=1e-2)  # fp16 storage of the kept parts


# ---- engine rules ---------------------------------------------------------------------------------

def _specs(overrides=None, sym=True):
    cfg = QuantConfig(bits=4, group_size=32, sym=sym, overrides=overrides or {}, unfused=True)
    return {f"model.layers.{i}.{n}": (None if cfg.spec_for(f"model.layers.{i}.{n}").keep else
                                      cfg.spec_for(f"model.layers.{i}.{n}"))
            for i in range(2) for n in get_arch("llama").linears}


def test_engine_rules():
    arch = get_arch("llama")
    check_engine(_specs(MIXED, sym=False), arch, "gptq", "vllm")  # vLLM's GPTQ kernels run 2/3/4/8, asym
    with pytest.raises(CheckpointError, match=r"4/8-bit weights only, but 5 module.*layers\.0\.mlp\.gate_proj: 3 bits.*--format gptq"):
        check_engine(_specs(MIXED), arch, "compressed-tensors", "vllm")
    with pytest.raises(CheckpointError, match="q_proj/k_proj/v_proj as one matmul.*layer 1.*q_proj=w3g32"):
        check_engine(_specs({r"1\.self_attn\.q_proj": {"bits": 3}}), arch, "gptq", "vllm")
    with pytest.raises(CheckpointError, match="one scheme for every decoder linear.*compressed-tensors"):
        check_engine(_specs(MIXED), arch, "gptq", "transformers")
    with pytest.raises(CheckpointError, match="asymmetric.*--sym"):
        check_engine(_specs(sym=False), arch, "compressed-tensors", "transformers")
    with pytest.raises(CheckpointError, match="asymmetric.*--sym"):
        check_engine(_specs(sym=False), arch, "gptq", "gptqmodel")
    check_engine(_specs(MIXED), arch, "compressed-tensors", "transformers")
    check_engine(_specs({r"1\.self_attn\.q_proj": {"bits": 3}}), arch, "gptq", "gptqmodel")


def test_gptq_dynamic_rules_also_match_vllm_fused_names():
    arch = get_arch("llama")
    specs = _specs(MIXED)
    qc = quantization_config(specs, QuantConfig(bits=4, group_size=32, sym=True), arch)
    for name, spec in specs.items():
        assert spec_from_quantization_config(qc, name) == spec, name
    # vLLM looks rules up by its fused module names
    assert spec_from_quantization_config(qc, "model.layers.0.self_attn.qkv_proj") == ModuleSpec(2, 32, True)
    assert spec_from_quantization_config(qc, "model.layers.0.mlp.gate_up_proj") == ModuleSpec(3, 32, True)
    assert spec_from_quantization_config(qc, "model.layers.1.self_attn.qkv_proj") == ModuleSpec(4, 32, True)
    assert qc["modules_in_block_to_quantize"][0] == list(arch.sequential[0])


# ---- integrity ------------------------------------------------------------------------------------

def _data_offset(path):
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + n, json.loads(path.read_bytes()[8:8 + n])


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_tampered_shard_names_file_and_tensor(quantized, tmp_path, fmt):
    out = save(quantized, "uniform", tmp_path / "ck", fmt)
    shard = out / "model.safetensors"
    start, header = _data_offset(shard)
    victim = "model.layers.1.mlp.up_proj." + ("qweight" if fmt == "gptq" else "weight_packed")
    lo, _ = header[victim]["data_offsets"]
    raw = bytearray(shard.read_bytes())
    raw[start + lo + 5] ^= 0x10
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: SHA-256 mismatch for {re.escape(victim)} \(contents changed\)"):
        load_quantized(out)
    load_quantized(out, verify=False)  # the user can still opt out


def test_shard_digests_are_checked_against_hmq_json(quantized, tmp_path, caplog):
    """A shard re-saved without digests, or one whose digest is not the one hmq.json lists, is refused
    with its name; a checkpoint another tool wrote (no hmq.json, no digests) loads with a warning."""
    from safetensors.torch import load_file, save_file

    out = save(quantized, "uniform", tmp_path / "ck", "gptq")
    shard = out / "model.safetensors"
    tensors = load_file(shard)
    save_file(tensors, shard)  # same tensors, no hmq digests in the header
    with pytest.raises(CheckpointError, match=r"model\.safetensors: the shard carries no SHA-256 digests, but hmq\.json"):
        load_quantized(out)
    out2 = save(quantized, "uniform", tmp_path / "ck2", "gptq")
    meta = json.loads((out2 / "hmq.json").read_text())
    meta["shard_sha256"]["model.safetensors"] = "0" * 64
    (out2 / "hmq.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"is not the one hmq\.json lists \(000000000000"):
        load_quantized(out2)
    (out / "hmq.json").unlink()  # now a foreign checkpoint: nothing to check it against
    import logging

    hmq_log = logging.getLogger("hmq")  # the CLI, once run in this process, stops it propagating
    hmq_log.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING", logger="hmq"):
            load_quantized(out)
    finally:
        hmq_log.removeHandler(caplog.handler)
    assert "carries no SHA-256 digests" in caplog.text


def test_truncated_and_missing_shards_are_named(quantized, tmp_path):
    out = save(quantized, "uniform", tmp_path / "ck", "gptq")
    shard = out / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"cannot read shard .*model\.safetensors.*truncated"):
        load_quantized(out)
    model, cfg = quantized["uniform"]
    sharded = save_quantized(model, None, tmp_path / "sharded", cfg, max_shard_size="20KB")
    files = sorted(sharded.glob("*.safetensors"))
    assert len(files) > 2 and (sharded / "model.safetensors.index.json").is_file()
    assert torch.equal(load_quantized(sharded)(X).logits, load_quantized(sharded)(X).logits)
    files[1].unlink()
    with pytest.raises(CheckpointError, match=rf"missing shard\(s\) \['{files[1].name}'\]"):
        load_quantized(sharded)


def test_config_that_disagrees_with_tensors_is_named(quantized, tmp_path):
    out = save(quantized, "uniform", tmp_path / "ck", "gptq")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["dynamic"] = {r"+:^model\.layers\.0\.mlp\.down_proj$": {"bits": 8}}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.qweight has shape .* config and the tensors disagree"):
        load_quantized(out)


def test_nan_scales_refused_on_save_and_load(quantized, tmp_path):
    model, cfg = quantized["uniform"]
    bad = copy.deepcopy(model)
    bad.model.layers[0].mlp.up_proj.scales[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.scales holds NaN"):
        save_quantized(bad, None, tmp_path / "bad", cfg)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))
    out = save(quantized, "uniform", tmp_path / "ck", "compressed-tensors")
    tensors = read_tensors(out)
    tensors["model.layers.0.mlp.up_proj.weight_scale"][0, 0] = float("inf")
    from safetensors.torch import save_file
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})  # no digests: only the scale check
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight_scale .* NaN or Inf"):
        load_quantized(out, verify=False)  # the scale check holds even without the digest checks


def test_checkpoints_hold_no_pickles(quantized, tmp_path):
    for fmt in ("gptq", "compressed-tensors"):
        out = save(quantized, "mixed", tmp_path / fmt, fmt)
        assert {p.suffix for p in out.iterdir()} <= {".safetensors", ".json"}


# ---- real loaders ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["uniform", "mixed"])
def test_transformers_loads_compressed_tensors(quantized, tmp_path, kind):
    """transformers' own loader (with compressed-tensors) reads the checkpoint: same logits as hmq."""
    pytest.importorskip("compressed_tensors")
    import transformers

    out = save(quantized, kind, tmp_path / kind, "compressed-tensors", engine="transformers")
    ours = load_quantized(out)(X).logits
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any(isinstance(m, QuantLinear) for m in theirs.modules())
    logits = theirs(X).logits  # compressed-tensors decompresses on the first forward
    ref = dict(quantized[kind][0].named_modules())
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"):
        assert torch.equal(theirs.get_submodule(name).weight, ref[name].dequantize()), name
    assert torch.allclose(logits, ours, atol=1e-5, rtol=0)


def _gptqmodel():
    """GPTQModel, or a skip saying why not (it does not install beside torch 2.13 CPU: see docs/testing.md)."""
    try:
        import gptqmodel  # noqa: F401
        import optimum  # noqa: F401
    except Exception as exc:  # ImportError, or its import-time checks failing
        pytest.skip(f"gptqmodel/optimum not importable here: {type(exc).__name__}: {str(exc)[:120]}")
    return gptqmodel


@pytest.mark.gptqmodel
@pytest.mark.parametrize("kind", ["uniform", "mixed"])
def test_gptqmodel_loads_gptq(quantized, tmp_path, tokenizer_dir, kind):
    import transformers

    gptqmodel = _gptqmodel()
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    out = save(quantized, kind, tmp_path / kind, "gptq", engine="gptqmodel", tokenizer=tok)
    ours = load_quantized(out)(X).logits
    loaded = gptqmodel.GPTQModel.load(str(out), device="cpu", backend=gptqmodel.BACKEND.TORCH, dtype=torch.float16)
    bits = {n: getattr(m, "bits", None) for n, m in loaded.model.named_modules()}
    assert bits["model.layers.0.self_attn.q_proj"] == (2 if kind == "mixed" else 4)
    assert bits["model.layers.1.mlp.down_proj"] == (8 if kind == "mixed" else 4)
    theirs = loaded.model(X).logits.float()
    assert torch.allclose(theirs, ours, atol=3e-3, rtol=0)  # their fp16 compute vs our fp32


@pytest.mark.gptqmodel
def test_transformers_loads_uniform_gptq(quantized, tmp_path):
    import transformers

    _gptqmodel()
    out = save(quantized, "uniform", tmp_path / "u", "gptq", engine="transformers")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu")
    assert torch.allclose(theirs(X).logits, load_quantized(out)(X).logits, atol=1e-3, rtol=0)


# ---- the command line -----------------------------------------------------------------------------

def test_cli_quantize_to_compressed_tensors_and_export_back(tiny_model_dir, text_file, tmp_path, capsys):
    import cli

    from .test_cli import quantize_args

    ct = tmp_path / "ct"
    assert cli.main([str(a) for a in quantize_args(tiny_model_dir, text_file, ct, "--bits", 4, "--sym",
                                                   "--format", "compressed-tensors")]) == 0
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    capsys.readouterr()
    assert cli.main(["inspect", str(ct), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["modules"]) == 14 and {m["bits"] for m in report["modules"].values()} == {4}
    back = tmp_path / "gptq"
    assert cli.main(["export", str(ct), "--format", "gptq", "--out", str(back)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((back / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    assert json.loads((back / "hmq.json").read_text())["exported_from"] == str(ct)
    a, b = load_quantized(ct), load_quantized(back)
    for name, m in a.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.qweight, b.get_submodule(name).qweight) and torch.equal(m.scales, b.get_submodule(name).scales)
    assert (back / "tokenizer_config.json").is_file()


def test_cli_refuses_what_the_engine_cannot_load_before_quantizing(tiny_model_dir, text_file, tmp_path, capsys,
                                                                     monkeypatch):
    import cli
    import quant.pipeline

    from .test_cli import quantize_args

    def must_not_run(*a, **kw):
        raise AssertionError("quantization ran before the engine check")

    monkeypatch.setattr(quant.pipeline, "quantize_model", must_not_run)

    out = tmp_path / "w3"
    code = cli.main([str(a) for a in quantize_args(tiny_model_dir, text_file, out, "--bits", 3,
                                                   "--format", "compressed-tensors")])
    err = capsys.readouterr().err
    assert code == 2 and "vllm would not load this checkpoint as compressed-tensors" in err and "--format gptq" in err
    assert not out.exists()
    assert cli.main([str(a) for a in quantize_args(tiny_model_dir, text_file, out, "--bits", 3,
                                                   "--format", "compressed-tensors", "--engine", "transformers")]) == 2
    assert "asymmetric" in capsys.readouterr().err


def test_the_readers_are_still_importable_from_export():
    import quant.export
    import quant.loading

    for name in ("load_quantized", "read_tensors", "read_quantization_config", "is_quantized_checkpoint", "shard_files"):
        assert getattr(quant.export, name) is getattr(quant.loading, name)
    with pytest.raises(AttributeError):
        quant.export.no_such_reader
