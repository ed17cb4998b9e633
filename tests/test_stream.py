"""Streaming from disk: a model whose decoder layers stay in its safetensors shards until the layer
sweep needs them quantizes and evaluates exactly as the same model held in memory."""
import json

import numpy as np
import pytest
import torch

from quant.config import QuantConfig
from quant.evaluate import perplexity
from quant.export import save_quantized
from quant.model_io import load_model
from quant.pipeline import quantize_model
from quant.qlinear import QuantLinear
from quant.stream import ShardStore, StreamError, is_streamed

from .conftest import save_tiny, windows

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, tokenizer_dir):
    """A 4-layer tiny Llama saved in many small shards, untied head, as big models are."""
    path = save_tiny(tmp_path_factory.mktemp("sharded"), tokenizer_dir, "100KB", num_hidden_layers=4,
                     tie_word_embeddings=False)
    assert len(list(path.glob("model-*.safetensors"))) > 3
    return path


def layer_fp_weights(model) -> list[str]:
    """Names of decoder-layer fp parameters that hold data (not on the meta device)."""
    return [n for n, p in model.model.layers.named_parameters() if p.device.type != "meta"]


def test_streamed_model_holds_no_decoder_layer(sharded_dir):
    model, _, _ = load_model(str(sharded_dir), stream=True)
    assert is_streamed(model)
    assert layer_fp_weights(model) == []
    assert model.lm_head.weight.device.type == "cpu" and model.model.embed_tokens.weight.device.type == "cpu"


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_perplexity_equals_in_memory(sharded_dir, tiny_model_dir, tied):
    folder = tiny_model_dir if tied else sharded_dir
    whole, _, _ = load_model(str(folder))
    streamed, _, _ = load_model(str(folder), stream=True)
    if tied:
        assert streamed.lm_head.weight is streamed.model.embed_tokens.weight
    ids = windows(6, 32, seed=3).flatten()
    ref = perplexity(whole, ids, 32, progress=False)
    got = perplexity(streamed, ids, 32, progress=False)
    assert got["nll"] == ref["nll"]
    assert layer_fp_weights(streamed) == []  # evaluation dropped every layer again


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_streamed_quantize_equals_in_memory(sharded_dir, tmp_path, method):
    cfg = QuantConfig(bits=3, group_size=32, method=method)
    calib = windows(4, 32)
    whole, tok, arch = load_model(str(sharded_dir))
    streamed, _, _ = load_model(str(sharded_dir), stream=True)
    quantize_model(whole, arch, calib, cfg, CPU, progress=False)
    quantize_model(streamed, arch, calib, cfg, CPU, progress=False)
    a = {n: m for n, m in whole.named_modules() if isinstance(m, QuantLinear)}
    b = {n: m for n, m in streamed.named_modules() if isinstance(m, QuantLinear)}
    assert a.keys() == b.keys() and len(a) == 4 * 7
    for n in a:
        for key in ("qweight", "qzeros", "scales"):
            assert torch.equal(getattr(a[n], key), getattr(b[n], key)), (n, key)
    # what is left of the layers (norms) came from disk; the checkpoints are the same bytes
    save_quantized(whole, tok, tmp_path / "whole", cfg)
    save_quantized(streamed, tok, tmp_path / "streamed", cfg)
    digests = [json.loads((tmp_path / d / "hmq.json").read_text())["shard_sha256"] for d in ("whole", "streamed")]
    assert digests[0] == digests[1]


def test_shard_outside_the_folder_is_refused(sharded_dir, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(sharded_dir, copy)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    (tmp_path / "evil.safetensors").write_bytes((copy / index["weight_map"][first]).read_bytes())
    index["weight_map"][first] = "../evil.safetensors"
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(StreamError, match="outside the folder"):
        ShardStore(copy)
    with pytest.raises(StreamError, match="outside the folder"):  # not handed on to a whole-model loader
        load_model(str(copy), stream=True)


def test_a_missing_shard_is_named(sharded_dir, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(sharded_dir, copy)
    victim = sorted(copy.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(StreamError, match=f"{victim.name}.*does not exist"):
        ShardStore(copy)


def test_mixed_quantize_from_a_measurement_streams_and_equals_in_memory(tiny_model_dir, text_file, tmp_path,
                                                                        monkeypatch):
    """`quantize --sensitivity S --budget B` streams the layers; the checkpoint is the one the whole
    model in memory gives, byte for byte."""
    import cli
    import quant.model_io

    common = ["--calib", str(text_file), "--nsamples", "4", "--seqlen", "32", "--group-size", "32", "--no-progress"]
    sens = tmp_path / "m.sens"
    assert cli.main(["measure", "--model", str(tiny_model_dir), *common, "--candidates", "2,3,4", "--loss-samples",
                     "2", "--loss-seqlen", "32", "--out", str(sens)]) == 0
    loads = []
    real = quant.model_io.load_model

    def spy(spec, dtype=torch.float32, stream=False, _force=None):
        loads.append(stream)
        return real(spec, dtype, stream=stream if _force is None else _force)

    outs = {}
    for label, force in (("streamed", None), ("whole", False)):
        monkeypatch.setattr(quant.model_io, "load_model", lambda s, d=torch.float32, stream=False: spy(s, d, stream, force))
        outs[label] = tmp_path / label
        assert cli.main(["quantize", "--model", str(tiny_model_dir), *common, "--sensitivity", str(sens),
                         "--budget", "3.0", "--out", str(outs[label])]) == 0
    assert loads == [True, True]  # both asked to stream; the second was made to load whole
    digests = [json.loads((outs[k] / "hmq.json").read_text())["shard_sha256"] for k in ("streamed", "whole")]
    assert digests[0] == digests[1]


def test_out_of_memory_names_the_stage_layer_and_fix(sharded_dir):
    from quant.engine import OutOfMemory, sweep

    model, _, arch = load_model(str(sharded_dir), stream=True)

    def step(i, layer, inputs):
        if i == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return inputs

    with pytest.raises(OutOfMemory, match=r"quantize: out of CPU memory at decoder layer 2 .*--batch-size"):
        sweep(model, arch, windows(2, 16), CPU, step, desc="quantize", keep=False, progress=False)
    assert layer_fp_weights(model) == []  # the layer that failed was dropped again


def test_streamed_measurement_and_search_equal_in_memory(sharded_dir):
    """The whole measurement (layer errors, Hutchinson traces, single, pair and in-context loss
    changes) and the search's database and stitched losses give the same numbers on a streamed model
    as on the same model in memory, and the streamed model is left with no layer loaded."""
    from calibration.measure import measure_sensitivity
    from calibration.search import StitchedLoss, candidate_database
    from calibration.units import parse_candidates

    calib, loss_ids = windows(4, 32), windows(2, 32, seed=5)
    cands = parse_candidates([2, 4], 32)
    cfg = QuantConfig(method="gptq", group_size=32)
    got = {}
    for label, stream in (("streamed", True), ("whole", False)):
        model, _, arch = load_model(str(sharded_dir), stream=stream)
        sens = measure_sensitivity(model, arch, calib, loss_ids, cands, cfg, CPU, max_probes=2, trace_tol=0.0,
                                   pair_bits=2, progress=False, context_bits=2)
        anchor = [0] * len(sens.units)
        db = candidate_database(model, arch, sens.units, cands, sens.cost, calib, cfg, CPU, anchor, progress=False)
        fit = StitchedLoss(model, arch, sens.units, db, loss_ids, CPU)
        moved = list(anchor)
        moved[5] = 1
        got[label] = (sens, [fit(anchor, True), fit(moved, True), fit(moved, False)])
        db.close()
        if stream:
            assert layer_fp_weights(model) == []
    a, b = got["streamed"][0], got["whole"][0]
    assert a.fingerprint == b.fingerprint
    for field in ("out_err", "sqnorm", "hx_trace", "trace", "single", "context_single"):
        assert np.allclose(np.array(getattr(a, field), dtype=float), np.array(getattr(b, field), dtype=float),
                           rtol=1e-5, atol=1e-7), field
    assert [p[:2] for p in a.pairs] == [p[:2] for p in b.pairs]
    assert np.allclose([p[2] for p in a.pairs], [p[2] for p in b.pairs], atol=1e-7)
    assert got["streamed"][1] == pytest.approx(got["whole"][1], abs=1e-6)


def test_strided_sample_reads_what_the_flat_view_gives(sharded_dir):
    """The fingerprint's sample of a streamed weight, read row by row from the shard, equals the same
    stride over the weight in memory, whether the stride is shorter or longer than a row."""
    store = ShardStore(sharded_dir)
    model, _, _ = load_model(str(sharded_dir), stream=False)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight"):
        w = model.get_parameter(name).detach().reshape(-1)
        for stride, count in ((1, 50), (7, 300), (129, 40), (w.numel() // 4096 or 1, 4096)):
            assert torch.equal(store.strided(name, stride, count), w[::stride][:count]), (name, stride)
    store.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int8])
def test_strided_sample_in_every_stored_dtype(tmp_path, dtype):
    from safetensors.torch import save_file

    t = (torch.randn(37, 53) * 20).to(dtype)
    save_file({"a.weight": t, "b": torch.ones(3)}, tmp_path / "model.safetensors")
    store = ShardStore(tmp_path)
    got = store.strided("a.weight", 5, 100)
    assert got.dtype == dtype and torch.equal(got, t.reshape(-1)[::5][:100])


def test_reference_boundaries_live_on_disk_and_equal_the_models_hidden_states(tmp_path, monkeypatch):
    """The layer boundaries the search and measurement replay from are kept on disk, one file each,
    and read back bit for bit: the fp model's own hidden states; truncating and rebuilding from a
    layer gives them again; the folder goes with the object."""
    import gc

    from quant.arch import get_arch
    from quant.variants import Reference

    from .conftest import build_tiny

    monkeypatch.setenv("HMQ_DATA_DIR", str(tmp_path))
    model = build_tiny(num_hidden_layers=3).eval()
    ids = windows(2, 16)
    with torch.no_grad():
        want = model(ids, output_hidden_states=True).hidden_states  # [embeddings, layer 0's output, ...]
    ref = Reference(model, get_arch("llama"), ids, CPU).build()
    assert len(ref.inputs) == 4 and len(list(ref.inputs.folder.glob("*.safetensors"))) == 4
    for i in range(3):  # the last entry of hidden_states is after the final norm
        assert torch.equal(ref.inputs[i], want[i]), i
    last = ref.inputs[-1].clone()
    ref.build(start=1)
    assert len(ref.inputs) == 4 and torch.equal(ref.inputs[-1], last) and torch.equal(ref.inputs[1], want[1])
    ref.inputs.truncate(2)
    assert len(ref.inputs) == 2 and torch.equal(ref.inputs[-1], want[1])
    with pytest.raises(IndexError):
        ref.inputs[2]
    folder = ref.inputs.folder
    del ref
    gc.collect()
    assert not folder.exists()
