"""Architectures beyond Llama: Gemma-3's sliding-window layers (each layer type with its own mask and
rotary tables), its logit soft cap, a BOS token at the start of every window where the tokenizer
starts texts with one, Phi-3's fused linears and GPT-2's Conv1D ones."""
import json

import pytest
import torch

from quant.arch import ARCHS, get_arch
from quant.capture import LAYER_KWARGS, capture_layer_inputs, run_layer
from quant.config import ConfigError
from quant.engine import head_logits

from .conftest import build_tiny, make_text, run, save_tiny, windows

CPU = torch.device("cpu")


def swept_logits(model, arch, x, inputs=None):
    inputs = inputs or capture_layer_inputs(model, model.get_submodule(arch.layers), x, CPU, 2)
    for layer in model.get_submodule(arch.layers):
        inputs = run_layer(layer, inputs)
    with torch.no_grad():
        return torch.cat([head_logits(model, arch, b.hidden) for b in inputs])


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_the_layer_sweep_gives_the_model_s_own_logits(model_type):
    model, arch = build_tiny(model_type), get_arch(model_type)
    x = windows(4, 32)
    with torch.no_grad():
        ref = model(input_ids=x).logits
    assert torch.equal(swept_logits(model, arch, x), ref)


def test_gemma_sliding_layers_get_their_own_mask_and_rotary_tables():
    model, arch = build_tiny("gemma3_text"), get_arch("gemma3_text")  # layer 0 slides over 8 tokens, layer 1 sees all
    x = windows(4, 32)
    inputs = capture_layer_inputs(model, model.model.layers, x, CPU, 2)
    which, kinds = inputs[0].kwargs[LAYER_KWARGS]
    assert which == (0, 1) and len(kinds) == 2
    with torch.no_grad():
        ref = model(input_ids=x).logits
    # what the sweep computed before: the first layer's kwargs for every layer
    for b in inputs:
        del b.kwargs[LAYER_KWARGS]
    assert not torch.allclose(swept_logits(model, arch, x, inputs), ref, atol=1e-3)


def test_a_logit_soft_cap_is_applied_as_the_model_applies_it():
    model, arch = build_tiny("gemma3_text", final_logit_softcapping=0.5), get_arch("gemma3_text")
    x = windows(2, 32)
    with torch.no_grad():
        ref = model(input_ids=x).logits
    assert ref.abs().max() < 0.5 and torch.allclose(swept_logits(model, arch, x), ref, atol=1e-6)


@pytest.fixture(scope="module")
def bos_tokenizer_dir(tokenizer_dir, tmp_path_factory):
    """The test tokenizer, made to start every text with ``<s>`` as Gemma's and Llama's do."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    path = tmp_path_factory.mktemp("bos-tok")
    tok.save_pretrained(path)
    return path


def test_every_window_starts_with_bos_where_the_tokenizer_adds_one(tokenizer_dir, bos_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from calibration.data import calibration_windows, leading_bos

    text = tmp_path / "t.txt"
    text.write_text(make_text(3000, 4))
    plain, with_bos = (AutoTokenizer.from_pretrained(d) for d in (tokenizer_dir, bos_tokenizer_dir))
    bos = with_bos.convert_tokens_to_ids("<s>")
    assert leading_bos(plain) is None and leading_bos(with_bos) == bos
    for split in ("calib", "all"):  # windows from stretches of a long text, or from the whole of a short one
        a = calibration_windows(plain, str(text), 6, 32, seed=1, split=split)
        b = calibration_windows(with_bos, str(text), 6, 32, seed=1, split=split)
        assert a.shape == b.shape == (6, 32) and (a != bos).all()
        assert (b[:, 0] == bos).all() and (b[:, 1:] != bos).all()


def test_perplexity_puts_bos_before_every_window():
    from quant.evaluate import perplexity

    model = build_tiny("gemma3_text")
    bos = model.config.bos_token_id
    text = windows(1, 3 * 31 + 5, seed=2)[0]
    text[text == bos] = 7
    stream = torch.cat([torch.tensor([bos]), text])  # as a tokenizer that adds BOS makes it
    res = perplexity(model, stream, seqlen=32, progress=False)
    assert res["windows"] == 3 and res["tokens"] == 3 * 31
    x = torch.cat([torch.full((3, 1), bos), text[: 3 * 31].view(3, 31)], 1)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1)
    nll = -logp.gather(2, x[:, 1:, None]).sum() / (3 * 31)
    assert res["nll"] == pytest.approx(float(nll), rel=1e-5)
    plain = perplexity(model, text, seqlen=32, progress=False)  # no BOS in the stream: windows cut as before
    assert plain["windows"] == 3 and plain["tokens"] == 3 * 31 and plain["nll"] != pytest.approx(res["nll"], rel=1e-3)


@pytest.mark.parametrize("model_type", ["gemma3_text", "gemma3"])
def test_gemma3_quantizes_and_evaluates_from_the_command_line(bos_tokenizer_dir, text_file, tmp_path, model_type):
    model_dir = save_tiny(tmp_path / "gemma", bos_tokenizer_dir, model_type=model_type)
    common = ["--calib", text_file, "--nsamples", 8, "--seqlen", 32, "--group-size", 32, "--no-progress"]
    for method in ("rtn", "gptq"):
        assert run("quantize", "--model", model_dir, "--bits", 3, "--method", method, *common,
                   "--out", tmp_path / method) == 0
        assert run("eval", "--model", tmp_path / method, "--baseline", "--data", text_file, "--seqlen", 32,
                   "--max-windows", 8, "--no-progress", "--json", tmp_path / f"{method}.json") == 0
    rtn, gptq = (json.loads((tmp_path / f"{m}.json").read_text()) for m in ("rtn", "gptq"))
    # a random model's perplexity does not rank the methods; that the runs did what they say, does
    assert gptq["baseline"]["ppl"] == rtn["baseline"]["ppl"] and len({gptq["ppl"], rtn["ppl"], rtn["baseline"]["ppl"]}) == 3
    assert gptq["windows"] == 8 and gptq["tokens"] == 8 * 31  # BOS first in every window
    meta = json.loads((tmp_path / "gptq" / "config.json").read_text())
    assert meta["model_type"] == model_type and "quantization_config" in meta


def test_an_unknown_architecture_names_the_supported_ones():
    with pytest.raises(ConfigError) as err:
        get_arch("gpt_neox")
    assert "gemma3_text" in str(err.value) and "llama" in str(err.value)


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_transformers_loads_the_compressed_tensors_export_of_every_architecture(model_type, tmp_path):
    pytest.importorskip("compressed_tensors")
    import transformers

    from quant.config import QuantConfig
    from quant.export import save_quantized
    from quant.loading import load_quantized
    from quant.pipeline import quantize_model

    from quant.export import CheckpointError

    model, arch = build_tiny(model_type), get_arch(model_type)
    cfg = QuantConfig(bits=4, group_size=32, sym=True)
    quantize_model(model, arch, windows(8, 32), cfg, CPU, progress=False)
    if arch.conv1d:  # GPT-2: transformers keeps Conv1D modules, which its quantized loaders do not replace
        with pytest.raises(CheckpointError, match="Conv1D"):
            save_quantized(model, None, tmp_path / "ct", cfg, fmt="compressed-tensors", engine="transformers")
        assert not (tmp_path / "ct").exists()
        return
    out = save_quantized(model, None, tmp_path / "ct", cfg, save_dtype=torch.float32, fmt="compressed-tensors",
                         engine="transformers")
    x = windows(2, 32, seed=3)
    with torch.no_grad():
        ours, reloaded = model(input_ids=x).logits, load_quantized(out)(input_ids=x).logits
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(input_ids=x).logits
    assert torch.equal(ours, reloaded)
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=0)


def test_gpt2_streamed_from_its_conv1d_checkpoint_equals_in_memory(tokenizer_dir, text_file, tmp_path):
    from quant.config import QuantConfig
    from quant.conv1d import TransposedLinear
    from quant.export import save_quantized
    from quant.loading import load_quantized, read_tensors
    from quant.model_io import load_model
    from quant.pipeline import quantize_model
    from quant.qlinear import QuantLinear

    folder = save_tiny(tmp_path / "gpt2", tokenizer_dir, model_type="gpt2")
    assert read_tensors(folder, verify=False)["transformer.h.0.mlp.c_fc.weight"].shape == (64, 128)  # (in, out)
    cfg = QuantConfig(bits=3, group_size=32, overrides={r"h\.1\.mlp\.c_fc": {"bits": 16}})
    x = windows(8, 32)
    outs = {}
    for stream in (False, True):
        model, tok, arch = load_model(str(folder), stream=stream)
        assert isinstance(model.transformer.h[0].attn.c_attn, TransposedLinear)
        quantize_model(model, arch, x, cfg, CPU, progress=False)
        outs[stream] = save_quantized(model, tok, tmp_path / f"q-{stream}", cfg, save_dtype=torch.float32)
        with torch.no_grad():
            logits = model(input_ids=x[:2]).logits
    a, b = read_tensors(outs[False]), read_tensors(outs[True])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["transformer.h.1.mlp.c_fc.weight"].shape == (64, 128)  # kept in fp: stored as Conv1D stores it
    assert "transformer.h.0.mlp.c_fc.qweight" in a
    reloaded = load_quantized(outs[True])
    assert isinstance(reloaded.transformer.h[0].mlp.c_fc, QuantLinear)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x[:2]).logits, logits)
    fp = load_model(str(folder))[0]
    with torch.no_grad():  # Conv1D turned into linears computes what the checkpoint's model computes
        from transformers import AutoModelForCausalLM

        assert torch.allclose(fp(input_ids=x[:2]).logits, AutoModelForCausalLM.from_pretrained(folder)(input_ids=x[:2]).logits,
                              atol=1e-5)
