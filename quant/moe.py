"""Mixture-of-experts blocks as plain linears.

transformers 5 stores the routed experts of a Mixtral, Qwen2-MoE, Qwen3-MoE or DeepSeek-V2 block as two
3-D parameters (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)) inside one ``*Experts`` module,
which no stage can see as linears. hmq turns that module into an :class:`ExpertLinears`: a list of
per-expert MLPs, each with its own ``nn.Linear`` gate, up and down projections, named as the
checkpoints on disk and vLLM's MoE loaders name them (``mlp.experts.3.gate_proj``; Mixtral's
``block_sparse_moe.experts.3.w1``). It is called exactly as the fused module is (hidden states,
top-k indices, top-k weights), so the block's router and shared experts are untouched.

Calibration reaches every expert: inside :func:`all_experts` each expert runs on *every* token, so
its linears' Hessians are estimated from the whole calibration set (as llm-compressor's
``moe_calibrate_all_experts`` does), while the block's output still follows the router. How many
tokens the router really sent each expert is counted, and experts it starves are named in a warning.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from . import dist
from .config import ConfigError

log = logging.getLogger("hmq")


@dataclass(frozen=True)
class Experts:
    """Where a MoE block's routed experts are and what their linears are called (architecture data)."""

    gate: str = "gate_proj"  # names of each expert's linears, as the checkpoint stores them
    up: str = "up_proj"
    down: str = "down_proj"
    checkpoint_block: str = ""  # Mixtral: the block is ``mlp`` in transformers 5 but ``block_sparse_moe`` on disk

    @property
    def linears(self) -> tuple[str, str, str]:
        return self.gate, self.up, self.down


def expert_block(name: str) -> str | None:
    """The experts module a linear belongs to (``model.layers.3.mlp.experts.5.w1`` ->
    ``model.layers.3.mlp.experts``; a unit kind ``mlp.experts.5.gate+up`` -> ``mlp.experts``), or None."""
    head, sep, rest = name.partition(".experts.")
    return head + ".experts" if sep and rest.partition(".")[0].isdigit() else None


class ExpertMLP(nn.Module):
    """One routed expert: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, inter: int, act_fn, names: Experts, dtype=None, device=None):
        super().__init__()
        self.names = names
        for name, (i, o) in zip(names.linears, ((hidden, inter), (hidden, inter), (inter, hidden))):
            setattr(self, name, nn.Linear(i, o, bias=False, dtype=dtype, device=device))
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names.linears)
        return down(self.act_fn(gate(x)) * up(x))


class ExpertLinears(nn.ModuleList):
    """The routed experts of one block as a list of :class:`ExpertMLP` (see the module docstring)."""

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)
        self.route_all = False  # inside all_experts(): every expert also runs on the tokens it was not sent
        self.routed = torch.zeros(len(experts), dtype=torch.long)  # tokens the router sent each expert (route_all runs)

    @property
    def num_experts(self) -> int:
        return len(self)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden_states (T, H); top_k_index, top_k_weights (T, k)
        out = torch.zeros_like(hidden_states)
        if self.route_all:  # counted before any expert runs: a statistics pass may stop inside the first one
            self.routed += torch.bincount(top_k_index.reshape(-1).cpu(), minlength=len(self))[:len(self)]
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if self.route_all:
                y = expert(hidden_states)[token]  # (T, H) computed, the routed rows kept
            elif token.numel() == 0:
                continue
            else:
                y = expert(hidden_states[token])
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def _is_fused_experts(module: nn.Module) -> bool:
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3
            and hasattr(module, "act_fn") and getattr(module, "is_concatenated", True)  # [gate; up], not interleaved
            and not getattr(module, "is_transposed", False)
            and not getattr(module, "has_bias", False))


def unfuse_experts(layers: nn.Module, names: Experts) -> int:
    """Replace every fused ``*Experts`` module under ``layers`` by an equal :class:`ExpertLinears`, in
    place (on the meta device for a streamed skeleton); where ``names.checkpoint_block`` is set, the
    block is registered under that name (its ``mlp`` attribute still reaches it, so the layer's forward
    is unchanged). Returns how many were replaced."""
    found = [(n, m) for n, m in layers.named_modules() if _is_fused_experts(m)]
    odd = [(n, m) for n, m in layers.named_modules()
           if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor) and not _is_fused_experts(m)]
    if odd:
        name, m = odd[0]
        raise ConfigError(f"{name} ({type(m).__name__}) stores its experts in a layout hmq does not unfuse yet "
                          "(transposed, interleaved gate/up, or with biases): its experts cannot be quantized. "
                          "Supported: [gate; up] stacked as (experts, 2 × intermediate, hidden), no bias.")
    for name, fused in found:
        gu, down = fused.gate_up_proj, fused.down_proj  # (E, 2I, H), (E, H, I)
        n_exp, two_inter, hidden = gu.shape
        inter = two_inter // 2
        experts = [ExpertMLP(hidden, inter, fused.act_fn, names, dtype=gu.dtype, device=gu.device) for _ in range(n_exp)]
        if gu.device.type != "meta":
            with torch.no_grad():
                for e, expert in enumerate(experts):
                    getattr(expert, names.gate).weight.copy_(gu[e, :inter])  # (I, H)
                    getattr(expert, names.up).weight.copy_(gu[e, inter:])
                    getattr(expert, names.down).weight.copy_(down[e])  # (H, I)
        for expert in experts:
            expert.requires_grad_(gu.requires_grad)
        parent_name, _, child = name.rpartition(".")
        parent = layers.get_submodule(parent_name) if parent_name else layers
        setattr(parent, child, ExpertLinears(experts))
        if names.checkpoint_block:
            _rename_block(layers, parent_name, names.checkpoint_block)
    return len(found)


def _rename_block(layers: nn.Module, block_path: str, new: str) -> None:
    """Register the block at ``block_path`` (``3.mlp``) under ``new`` (``3.block_sparse_moe``) in its
    decoder layer, keeping the old attribute as a plain reference for the layer's own forward."""
    owner_path, _, old = block_path.rpartition(".")
    owner = layers.get_submodule(owner_path) if owner_path else layers
    if old == new or old not in owner._modules:
        return
    block = owner._modules[old]
    owner._modules = {(new if k == old else k): v for k, v in owner._modules.items()}
    owner.__dict__[old] = block  # ``self.mlp`` in the layer's forward finds it before nn.Module's lookup


@contextlib.contextmanager
def all_experts(module: nn.Module, prefix: str = ""):
    """Inside: every expert under ``module`` runs on every token (for statistics), the block's output
    still following the router; on leaving, experts the router sent fewer tokens than their input
    width are named in a warning (their Hessians come from the other tokens; as routed, they would
    be singular)."""
    blocks = [(n, m) for n, m in module.named_modules() if isinstance(m, ExpertLinears)]
    for _, m in blocks:
        m.route_all, m.routed = True, torch.zeros(len(m), dtype=torch.long)
    try:
        yield
    finally:
        for _, m in blocks:
            m.route_all = False
    for name, m in blocks:  # (not on an error: the other processes would wait in the gather)
        routed = m.routed
        if dist.world() > 1:  # every process saw its own share of the windows
            routed = torch.tensor(dist.gather_all(routed.tolist())).sum(0)
        starved = [(e, int(c)) for e, c in enumerate(routed) if c < _in_width(m[e])]
        if starved and int(routed.sum()) > 0 and m not in _WARNED and dist.is_main():
            _WARNED.add(m)
            desc = ", ".join(f"{e} ({c} tokens)" for e, c in starved[:8])
            log.warning("%s: the router sent experts %s%s fewer calibration tokens than their input width; "
                        "their Hessians were taken over all tokens instead. More calibration windows "
                        "(--nsamples) give them more.", prefix + name, desc, " …" if len(starved) > 8 else "")


_WARNED: "weakref.WeakSet[ExpertLinears]" = weakref.WeakSet()  # blocks named once, not once per statistics pass


def _in_width(expert: nn.Module) -> int:
    return getattr(expert, expert.names.gate).in_features
