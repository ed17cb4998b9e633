"""Architectures as data: where the decoder layers are, which linears they hold, in which order
GPTQ's true-sequential mode quantizes them, and which must share one bit width because inference
engines (vLLM, exllama, TGI) fuse them into one matmul."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from .config import ConfigError
from .conv1d import linearize
from .moe import Experts, unfuse_experts


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
    experts: Experts | None = None  # a MoE block's routed experts (quant/moe.py); ``*`` in a name is each expert

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential for name in group)

    def at(self, layer) -> "Arch":
        """This layout as one decoder layer has it (the layer, or the names of its modules): every
        ``*`` (an expert index) expanded over the layer's experts, and names the layer lacks dropped
        (a DeepSeek-V2 model keeps a dense MLP in its first layers, Qwen2-MoE in its
        ``mlp_only_layers``). In steps and shared inputs all experts go together; each expert's gate
        and up form a fused group of their own."""
        if not self.experts:  # every layer holds every linear of the table
            return self
        present = {n for n, _ in layer.named_modules()} if isinstance(layer, nn.Module) else set(layer)

        def expand(name: str) -> list[str]:
            head, star, tail = name.partition(".*.")
            if not star:
                return [name] if name in present else []
            found = (n[len(head) + 1:-len(tail) - 1] for n in present if n.startswith(head + ".") and n.endswith("." + tail))
            return [f"{head}.{e}.{tail}" for e in sorted(int(k) for k in found if k.isdigit())]

        def flat(group) -> tuple[str, ...]:
            return tuple(n for name in group for n in expand(name))

        fused, fused_names = [], []
        for k, group in enumerate(self.fused):
            parts = [expand(n) for n in group]
            if any(not p for p in parts):
                continue
            for members in zip(*parts):  # one group per expert, or the one group of a dense layer
                fused.append(members)
                fused_names.append(self.fused_names[k] if self.fused_names and "*" not in group[0] else "")
        return dataclasses.replace(
            self, sequential=tuple(g for g in map(flat, self.sequential) if g), fused=tuple(fused),
            fused_names=tuple(fused_names) if self.fused_names else (),
            shared_input=tuple(g for g in map(flat, self.shared_input) if len(g) > 1),
            blocks=tuple(b for b in self.blocks if b.out_linear in present and b.module in present),
            experts=None)

    def adapt(self, layers: nn.Module) -> None:
        """Turn the decoder layers' Conv1D linears and fused experts into plain ``nn.Linear`` modules, in
        place (idempotent; on the meta device for a streamed skeleton)."""
        if self.conv1d:
            linearize(layers)
        if self.experts:
            unfuse_experts(layers, self.experts)


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

# Mixture-of-experts blocks (quant/moe.py turns their 3-D expert tensors into per-expert linears).
# ``*`` is each routed expert; every expert is a unit of its own, its gate and up fused as vLLM runs
# them. The routers (``mlp.gate``, a bare weight) and Qwen2-MoE's one-output ``shared_expert_gate``
# stay in floating point by rule, as llm-compressor and vLLM keep them. Names a layer lacks are
# dropped per layer (``Arch.at``): the dense MLP names cover DeepSeek-V2's first layers and Qwen's
# ``mlp_only_layers``. Steps follow the data: every expert's gate/up reads the block's input, so they
# share one Hessian; each down projection reads its own expert's activations.
def _moe(block: str, experts: Experts, shared: str = "", attention=(_QKV, ("self_attn.o_proj",)),
         attention_fused=((_QKV, "self_attn.qkv_proj"),), attention_shared=(_QKV,)) -> Arch:
    e = f"{block}.experts.*."
    routed_gate_up = (e + experts.gate, e + experts.up)
    shared_gate_up = (f"{block}.{shared}.gate_proj", f"{block}.{shared}.up_proj") if shared else ()
    gate_up = (*_GATE_UP, *routed_gate_up, *shared_gate_up)
    down = ("mlp.down_proj", e + experts.down, *((f"{block}.{shared}.down_proj",) if shared else ()))
    fused = [*attention_fused, (_GATE_UP, "mlp.gate_up_proj"), (routed_gate_up, "")]
    if shared:
        fused.append((shared_gate_up, f"{block}.{shared}.gate_up_proj"))
    return Arch(
        layers="model.layers", sequential=(*attention, gate_up, down),
        fused=tuple(g for g, _ in fused), fused_names=tuple(n for _, n in fused),
        shared_input=(*attention_shared, gate_up),
        blocks=(Block("self_attn", "self_attn.o_proj", True), Block("mlp", "mlp.down_proj", False)),
        experts=experts)


MIXTRAL = _moe("block_sparse_moe", Experts(gate="w1", up="w3", down="w2", checkpoint_block="block_sparse_moe"))
QWEN3_MOE = _moe("mlp", Experts())
QWEN2_MOE = _moe("mlp", Experts(), shared="shared_expert")
# DeepSeek-V2's multi-head latent attention: q (or its low-rank q_a -> q_b) and the compressed kv_a read
# the layer input; q_b and kv_b read normed low-rank codes; vLLM fuses q_a with kv_a.
_MLA_IN = ("self_attn.q_proj", "self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")
DEEPSEEK_V2 = _moe("mlp", Experts(), shared="shared_experts",
                   attention=(_MLA_IN, ("self_attn.q_b_proj", "self_attn.kv_b_proj"), ("self_attn.o_proj",)),
                   attention_fused=((("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), "self_attn.fused_qkv_a_proj"),),
                   attention_shared=(_MLA_IN,))

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
    "mixtral": MIXTRAL,
    "qwen2_moe": QWEN2_MOE,
    "qwen3_moe": QWEN3_MOE,
    "deepseek_v2": DEEPSEEK_V2,
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
