"""Architectures as data: where the decoder layers are, which linears they hold, in which order
GPTQ's true-sequential mode quantizes them, and which must share one bit width because inference
engines (vLLM, exllama, TGI) fuse them into one matmul."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from .config import ConfigError


@dataclass(frozen=True)
class Block:
    """A submodule whose output is a function of its last linear's input alone once its weights are
    fixed, e.g. attention returns ``(o_proj(x), weights)``: the pipeline replays it from that input."""

    module: str
    out_linear: str
    returns_tuple: bool


@dataclass(frozen=True)
class Arch:
    layers: str  # attribute path of the nn.ModuleList of decoder layers
    sequential: tuple[tuple[str, ...], ...]  # linears per step, names relative to a layer
    fused: tuple[tuple[str, ...], ...]  # groups that engines run as one matmul: same bits, group size, sym
    fused_names: tuple[str, ...] = ()  # vLLM's name for each fused group (what its per-module rules match)
    shared_input: tuple[tuple[str, ...], ...] = ()  # linears the layer feeds the very same tensor
    blocks: tuple[Block, ...] = ()  # replayable blocks (see calibration/capture.py)
    norm: str = "model.norm"  # the final norm, between the last decoder layer and lm_head
    conv1d: bool = False  # transformers builds its linears as Conv1D (weight (in, out)); see quant/conv1d.py

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential for name in group)


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
LLAMA_LIKE = Arch(
    layers="model.layers",
    sequential=(_QKV, ("self_attn.o_proj",), _GATE_UP, ("mlp.down_proj",)),
    fused=(_QKV, _GATE_UP),
    fused_names=("self_attn.qkv_proj", "mlp.gate_up_proj"),
    shared_input=(_QKV, _GATE_UP),
    blocks=(Block("self_attn", "self_attn.o_proj", True), Block("mlp", "mlp.down_proj", False)),
)

# Gemma-3 has the Llama layout plus norms after attention and the MLP, which sit outside the
# blocks and linears hmq touches; its scaled embedding and per-layer-type masks and rotary tables
# come through the captured layer inputs (quant/capture.py). The multimodal ``gemma3`` holds the
# same decoder under ``model.language_model``; only its text part is quantized.
GEMMA3_MULTIMODAL = dataclasses.replace(LLAMA_LIKE, layers="model.language_model.layers",
                                        norm="model.language_model.norm")

# Phi-3 checkpoints store q/k/v and gate/up already fused, as the engines run them: each fused
# linear is one unit, quantized on its own, under the names vLLM's Phi-3 loader reads.
PHI3 = Arch(
    layers="model.layers",
    sequential=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    fused=(),
    blocks=(Block("self_attn", "self_attn.o_proj", True), Block("mlp", "mlp.down_proj", False)),
)

# GPT-2: fused c_attn (q/k/v in one Conv1D), absolute position embeddings; its Conv1D linears are
# plain linears to every stage once loaded (quant/conv1d.py).
GPT2 = Arch(
    layers="transformer.h",
    sequential=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    fused=(),
    blocks=(Block("attn", "attn.c_proj", True), Block("mlp", "mlp.c_proj", False)),
    norm="transformer.ln_f",
    conv1d=True,
)

# model_type (config.json) -> layout. Every entry here is exercised by tests/test_archs.py.
ARCHS: dict[str, Arch] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "gemma3_text": LLAMA_LIKE,
    "gemma3": GEMMA3_MULTIMODAL,
    "phi3": PHI3,
    "gpt2": GPT2,
}


def get_arch(model_type: str) -> Arch:
    if model_type not in ARCHS:
        raise ConfigError(
            f"architecture {model_type!r} is not supported yet; supported model types: {', '.join(sorted(ARCHS))}. "
            "Adding one is a table entry in quant/arch.py."
        )
    return ARCHS[model_type]


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def decoder_layers(model: nn.Module, arch: Arch) -> nn.ModuleList:
    return model.get_submodule(arch.layers)
