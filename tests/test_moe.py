"""Mixture-of-experts models (Mixtral, Qwen2-MoE with a shared expert, Qwen3-MoE with a dense layer,
DeepSeek-V2 with latent attention and a dense first layer): their 3-D expert tensors as per-expert
linears named as on disk, calibration that reaches every expert, per-expert units and widths, and
streaming, export and reload end to end."""
import json
import logging

import pytest
import torch

from quant.arch import get_arch
from quant.capture import capture_layer_inputs, collect_hessians, run_layer
from quant.config import QuantConfig
from quant.export import CheckpointError, check_engine, save_quantized
from quant.loading import load_quantized, read_tensors
from quant.moe import ExpertLinears, all_experts
from quant.pipeline import module_specs, quantize_model

from .conftest import build_tiny, make_text, run, save_tiny, windows

CPU = torch.device("cpu")
MOE = ["deepseek_v2", "mixtral", "qwen2_moe", "qwen3_moe"]


@pytest.mark.parametrize("model_type", MOE)
def test_per_expert_linears_compute_what_the_fused_experts_compute_under_the_checkpoint_s_names(model_type, tmp_path):
    model, arch = build_tiny(model_type), get_arch(model_type)
    model.save_pretrained(tmp_path)  # transformers writes every expert's linears under their own names
    x = windows(4, 32)
    with torch.no_grad():
        ref = model(input_ids=x).logits
        arch.adapt(model.get_submodule(arch.layers))
        assert torch.allclose(model(input_ids=x).logits, ref, atol=1e-6, rtol=0)
    blocks = [m for m in model.modules() if isinstance(m, ExpertLinears)]
    assert blocks and all(len(b) == 4 for b in blocks)
    assert set(model.state_dict()) - {"lm_head.weight"} == set(read_tensors(tmp_path, verify=False))


@pytest.mark.parametrize("model_type", MOE)
def test_each_expert_is_a_unit_of_its_own_and_dense_layers_keep_their_mlp(model_type):
    from calibration.units import build_units

    model, arch = build_tiny(model_type), get_arch(model_type)
    arch.adapt(model.get_submodule(arch.layers))
    units = build_units(model, arch)
    for i, layer in enumerate(model.get_submodule(arch.layers)):
        kinds = [u.kind for u in units if u.layer == i]
        experts = [k for k in kinds if ".experts." in k]
        moe = any(isinstance(m, ExpertLinears) for m in layer.modules())
        assert len(experts) == (8 if moe else 0), kinds  # per expert: gate+up (fused, as vLLM runs them) and down
        assert moe or "mlp.gate+up" in kinds
        assert not any(k.endswith(("mlp.gate", "shared_expert_gate")) for k in kinds)  # routers stay in fp


def _route_every_token_to_experts_0_and_1(block):
    def router(hidden):  # the top-2 of every token: experts 2 and 3 are never sent one
        t = hidden.reshape(-1, hidden.shape[-1]).shape[0]
        weights = torch.tensor([[0.7, 0.3]]).expand(t, 2)
        return torch.zeros(t, 4), weights, torch.tensor([[0, 1]]).expand(t, 2)

    block.gate.forward = router


def test_every_expert_gets_a_hessian_from_every_token_while_the_output_follows_the_router(caplog):
    hmq_log = logging.getLogger("hmq")  # once the CLI has set it up it does not propagate to caplog's root handler:
    hmq_log.addHandler(caplog.handler)  # its records reach caplog directly, and only so, whatever ran before
    propagate, hmq_log.propagate = hmq_log.propagate, False
    try:
        _expert_hessians_and_warnings(caplog)
    finally:
        hmq_log.removeHandler(caplog.handler)
        hmq_log.propagate = propagate


def _expert_hessians_and_warnings(caplog):
    model, arch = build_tiny("qwen3_moe", mlp_only_layers=[]), get_arch("qwen3_moe")  # both layers MoE
    arch.adapt(model.get_submodule(arch.layers))
    layer = model.model.layers[0]
    for each in model.model.layers:
        _route_every_token_to_experts_0_and_1(each.mlp)
    inputs = capture_layer_inputs(model, model.model.layers, windows(4, 32), CPU, 2)
    with torch.no_grad():
        plain = run_layer(layer, inputs)
    here = arch.at(layer)
    downs = [n for n in here.linears if n.endswith("down_proj")]
    with caplog.at_level(logging.WARNING, logger="hmq"):
        hs, _ = collect_hessians(layer, downs, inputs, "model.layers.0.")
    assert len(hs) == 4 and all(torch.isfinite(H).all() and H.diagonal().min() > 0 for H in hs.values())
    assert not torch.allclose(hs[downs[2]], hs[downs[3]])  # each from its own expert's activations
    assert "model.layers.0.mlp.experts" in caplog.text and "2 (0 tokens), 3 (0 tokens)" in caplog.text
    here1 = arch.at(model.model.layers[1])
    with caplog.at_level(logging.WARNING, logger="hmq"):  # every block is named once, each layer's own
        collect_hessians(model.model.layers[1], [n for n in here1.linears if n.endswith("down_proj")],
                         run_layer(layer, inputs), "model.layers.1.")
        collect_hessians(layer, downs, inputs, "model.layers.0.")
    assert caplog.text.count("model.layers.1.mlp.experts:") == 1 and caplog.text.count("model.layers.0.mlp.experts:") == 1
    # every expert's gate and up read the block's input: one Hessian for all, over every token
    gate_up = [n for n in here.linears if n.endswith(("gate_proj", "up_proj"))]
    hs, _ = collect_hessians(layer, gate_up, inputs, "model.layers.0.", shared_input=here.shared_input)
    assert len(gate_up) == 8 and len({id(H) for H in hs.values()}) == 1
    assert torch.isfinite(hs[gate_up[0]]).all() and torch.linalg.eigvalsh(hs[gate_up[0]].double()).min() > 0
    with torch.no_grad(), all_experts(layer):
        routed = run_layer(layer, inputs)
    for a, b in zip(plain, routed):
        assert torch.allclose(a.hidden, b.hidden, atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v2"])
def test_streamed_moe_equals_in_memory_and_reloads_bit_identically(model_type, tokenizer_dir, tmp_path):
    from quant.model_io import load_model
    from quant.stream import is_streamed

    folder = save_tiny(tmp_path / "fp", tokenizer_dir, max_shard_size="60KB", model_type=model_type)
    cfg = QuantConfig(bits=4, group_size=32, sym=True, overrides={r"layers\.1\..*experts\.1\.": {"bits": 3}})
    x = windows(8, 32)
    outs = {}
    for stream in (False, True):
        model, tok, arch = load_model(str(folder), stream=stream)
        assert is_streamed(model) == stream
        quantize_model(model, arch, x, cfg, CPU, progress=False)
        outs[stream] = save_quantized(model, tok, tmp_path / f"q-{stream}", cfg, save_dtype=torch.float32,
                                      engine="gptqmodel")
        with torch.no_grad():
            logits = model(input_ids=x[:2]).logits
    a, b = read_tensors(outs[False]), read_tensors(outs[True])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    block = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    down = "w2" if model_type == "mixtral" else "down_proj"
    assert f"model.layers.1.{block}.experts.3.{down}.qweight" in a and f"model.layers.1.{block}.gate.weight" in a
    with torch.no_grad():
        assert torch.equal(load_quantized(outs[True])(input_ids=x[:2]).logits, logits)
    qc = json.loads((outs[True] / "config.json").read_text())["quantization_config"]
    three = [k for k, v in qc["dynamic"].items() if v.get("bits") == 3]
    assert three and all("experts" in k for k in three)


def test_experts_of_one_layer_may_differ_but_vllm_export_refuses_it(tmp_path):
    model, arch = build_tiny("mixtral"), get_arch("mixtral")
    cfg = QuantConfig(bits=4, group_size=32, sym=True, overrides={r"layers\.0\.block_sparse_moe\.experts\.2\.": {"bits": 8}})
    quantize_model(model, arch, windows(8, 32), cfg, CPU, progress=False)
    specs = module_specs(model, arch, cfg)
    assert specs["model.layers.0.block_sparse_moe.experts.2.w2"].bits == 8
    assert specs["model.layers.0.block_sparse_moe.experts.1.w2"].bits == 4
    planned = {n: (None if s.keep else s) for n, s in specs.items()}
    check_engine(planned, arch, "gptq", "gptqmodel")
    with pytest.raises(CheckpointError, match=r"experts of model\.layers\.0\.block_sparse_moe\.experts differ"):
        check_engine(planned, arch, "gptq", "vllm")
    with pytest.raises(CheckpointError, match="one scheme"):
        save_quantized(model, None, tmp_path / "vllm", cfg, engine="vllm")
    assert not (tmp_path / "vllm").exists()
    out = save_quantized(model, None, tmp_path / "gptqmodel", cfg, save_dtype=torch.float32, engine="gptqmodel")
    x = windows(2, 32, seed=4)
    with torch.no_grad():
        assert torch.equal(load_quantized(out)(input_ids=x).logits, model(input_ids=x).logits)


def test_a_moe_model_quantizes_measures_and_allocates_from_the_command_line(tokenizer_dir, tmp_path):
    folder = save_tiny(tmp_path / "fp", tokenizer_dir, model_type="qwen2_moe")
    text = tmp_path / "text.txt"
    text.write_text(make_text(600, 3))
    common = ["--model", folder, "--calib", text, "--nsamples", 8, "--seqlen", 32, "--group-size", 32, "--no-progress"]
    assert run("quantize", *common, "--bits", 4, "--out", tmp_path / "w4") == 0
    assert run("eval", "--model", tmp_path / "w4", "--data", text, "--seqlen", 32, "--max-windows", 4,
               "--no-progress", "--json", tmp_path / "w4.json") == 0
    assert json.loads((tmp_path / "w4.json").read_text())["windows"] == 4
    assert run("measure", *common, "--out", tmp_path / "m.sens") == 0
    assert run("quantize", *common, "--sensitivity", tmp_path / "m.sens", "--budget", 3.5, "--out", tmp_path / "mix") == 0
    qc = json.loads((tmp_path / "mix" / "config.json").read_text())["quantization_config"]
    widths = {v.get("bits", qc["bits"]) for v in qc.get("dynamic", {}).values()} | {qc["bits"]}
    assert len(widths) > 1  # a mixed allocation over the per-expert units


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_vllm_finds_each_layer_s_expert_scheme_in_the_compressed_tensors_export(model_type, tmp_path):
    from quant.compressed import specs_from_config

    model, arch = build_tiny(model_type), get_arch(model_type)
    block = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    cfg = QuantConfig(bits=4, group_size=32, sym=True, overrides={rf"layers\.0\.{block}\.experts\.": {"bits": 8}})
    quantize_model(model, arch, windows(8, 32), cfg, CPU, progress=False)
    out = save_quantized(model, None, tmp_path / "ct", cfg, save_dtype=torch.float32, fmt="compressed-tensors",
                         engine="vllm")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    for i, bits in ((0, 8), (1, 4)):  # vLLM looks a fused-experts module up as experts.0.{gate,up,down}_proj
        if model_type == "qwen3_moe" and i == 1:
            continue  # its second layer is dense (mlp_only_layers)
        names = [f"model.layers.{i}.{block}.experts.0.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
        found = specs_from_config(qc, names)
        assert all(s is not None and s.bits == bits for s in found.values()), found
    with torch.no_grad():
        x = windows(2, 32, seed=6)
        assert torch.equal(load_quantized(out)(input_ids=x).logits, model(input_ids=x).logits)


def test_an_adapted_mixtral_copies_and_keeps_its_block_under_both_names():
    import copy

    model, arch = build_tiny("mixtral"), get_arch("mixtral")
    arch.adapt(model.get_submodule(arch.layers))
    twin = copy.deepcopy(model)
    layer = twin.model.layers[0]
    assert layer.mlp is layer.block_sparse_moe and "mlp" not in layer._modules
    x = windows(2, 32)
    with torch.no_grad():
        assert torch.equal(twin(input_ids=x).logits, model(input_ids=x).logits)


def test_vllm_ties_every_expert_unit_of_a_layer_and_nothing_else():

    from calibration.mixed import expert_ties
    from calibration.units import build_units
    from quant.allocate import tie_groups

    model, arch = build_tiny("deepseek_v2"), get_arch("deepseek_v2")
    arch.adapt(model.get_submodule(arch.layers))
    units = build_units(model, arch)
    groups = [g for g in tie_groups(len(units), expert_ties(units)) if len(g) > 1]
    assert len(groups) == 1  # layer 0 is dense; layer 1's 4 experts × (gate+up, down) are one group
    assert sorted(units[k].kind for k in groups[0]) == sorted(
        f"mlp.experts.{e}.{k}" for e in range(4) for k in ("gate+up", "down_proj"))


def test_an_expert_layout_hmq_cannot_unfuse_is_refused_by_name():
    from torch import nn

    from quant.config import ConfigError
    from quant.moe import Experts, unfuse_experts

    class Transposed(nn.Module):  # gpt-oss style: (experts, hidden, 2 × intermediate), with biases
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(4, 64, 128))
            self.down_proj = nn.Parameter(torch.zeros(4, 64, 64))
            self.is_transposed, self.act_fn = True, nn.SiLU()

    layers = nn.ModuleList([nn.Module()])
    layers[0].mlp = nn.Module()
    layers[0].mlp.experts = Transposed()
    with pytest.raises(ConfigError, match=r"0\.mlp\.experts \(Transposed\) stores its experts in a layout"):
        unfuse_experts(layers, Experts())
