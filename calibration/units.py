"""What mixed precision allocates over: *units* (what gets one precision: a fused q/k/v or gate/up
group, or a single linear) and *candidates* (bits, group size) as data; the exact storage cost of a
unit under a candidate; a unit's weights, quantized at every candidate; and the fingerprint that
ties a measurement to one model."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from quant.arch import Arch, decoder_layers
from quant.config import ConfigError, ModuleSpec, QuantConfig, check_bits, check_group_size
from quant.methods import solve
from quant.packing import check_packable
from quant.quantizer import check_groupable, storage_bytes
from quant.stream import stored_sample


@dataclass(frozen=True)
class Candidate:
    bits: int  # 16 = keep in floating point
    group_size: int

    @property
    def label(self) -> str:
        return "fp16" if self.bits == 16 else f"w{self.bits}g{self.group_size}"


@dataclass(frozen=True)
class Unit:
    name: str  # e.g. model.layers.3.self_attn.{q,k,v}_proj
    members: tuple[str, ...]  # full names of its linears
    layer: int
    kind: str  # name inside the layer, e.g. self_attn.qkv_proj or mlp.down_proj
    in_features: int
    out_features: int  # summed over members
    member_out: tuple[int, ...] = ()  # out_features of each member

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


def build_units(model: nn.Module, arch: Arch, granularity: str = "fused") -> list[Unit]:
    """``fused``: a fused group (q/k/v, gate/up) is one unit, as inference engines run it as one
    matmul; ``linear``: every linear is its own unit (for engines that do not fuse)."""
    if granularity not in ("fused", "linear"):
        raise ConfigError(f"unit granularity {granularity!r} is unknown: use fused or linear.")
    units = []
    for i, layer in enumerate(decoder_layers(model, arch)):
        prefix, here = f"{arch.layers}.{i}.", arch.at(layer)
        groups = [(n,) for n in here.linears]
        if granularity == "fused":
            fused = {n: g for g in here.fused for n in g}
            groups = list(dict.fromkeys(fused.get(n, (n,)) for n in here.linears))
        for g in groups:
            lins = [layer.get_submodule(n) for n in g]
            if len(g) == 1:
                kind = g[0]
            else:
                head, _, _ = g[0].rpartition(".")
                kind = f"{head}.{'+'.join(n.rpartition('.')[2].removesuffix('_proj') for n in g)}"
            units.append(Unit(prefix + kind, tuple(prefix + n for n in g), i, kind, lins[0].in_features,
                              sum(lin.out_features for lin in lins), tuple(lin.out_features for lin in lins)))
    return units


def units_by_layer(units: list[Unit]) -> dict[int, list[int]]:
    """Decoder-layer index -> the indices of the units in it."""
    out: dict[int, list[int]] = {}
    for k, u in enumerate(units):
        out.setdefault(u.layer, []).append(k)
    return out


def parse_candidates(items, group_size: int, keep: bool = True) -> list[Candidate]:
    """Candidates from bit widths at ``group_size`` (``3``) or explicit (bits, group size) pairs
    (``"3g-1"``: 3 bits, one group per output channel; ``"w2g64"``). For each width the
    ``group_size`` candidate comes first (it is the one ``pair_bits`` measures pairs at)."""
    cands = set()
    for item in items:
        text = str(item).strip().lower().removeprefix("w")
        b, sep, g = text.partition("g")
        try:
            bits, gs = int(b), (int(g) if sep else group_size)
        except ValueError:
            raise ConfigError(f"candidate {item!r} is not a bit width (3) or bits and group size (3g128, 3g-1 for "
                              "one group per output channel).") from None
        check_bits(bits, "candidate bits")
        cands.add(Candidate(16, -1) if bits == 16 else Candidate(bits, check_group_size(gs, f"candidate {item!r} group size")))
    if keep:
        cands.add(Candidate(16, -1))
    if not cands:
        raise ConfigError("no candidate bit widths: pass some of 2, 3, 4, 8 (and 16 to allow keeping a unit).")
    return sorted(cands, key=lambda c: (c.bits, c.group_size != group_size, c.group_size))


def fingerprint(model: nn.Module, units: list[Unit]) -> str:
    """SHA-256 of the units' names and shapes plus 4096 weights sampled from each (rounded to fp16,
    so loading the same checkpoint in another dtype matches)."""
    h = hashlib.sha256()
    h.update(str(getattr(model.config, "model_type", "")).encode())
    for u in units:
        for name in u.members:
            shape, sample = stored_sample(model, name, 4096)  # a streamed model's weights are not read whole
            h.update(f"{name}:{shape}".encode())
            h.update(sample.to(torch.float16).cpu().numpy().tobytes())
    return h.hexdigest()


def candidate_cost(unit: Unit, cand: Candidate, partial_groups: bool) -> float:
    """Exact storage bytes of the unit under ``cand``; ``inf`` when it cannot be grouped or packed."""
    if cand.bits == 16:
        return float(unit.params * 2)
    try:
        check_groupable(unit.in_features, cand.group_size, unit.name, partial_groups)
        check_packable(unit.in_features, cand.bits)
        check_packable(unit.out_features, cand.bits)
    except ValueError:
        return math.inf
    return float(storage_bytes(unit.out_features, unit.in_features, cand.bits, cand.group_size))


def overhead_bytes(model, units) -> int:
    """fp16 bytes of everything the allocation does not choose: embeddings, norms, head, biases."""
    unit_params = {m for u in units for m in u.members}
    overhead = sum(p.numel() * 2 for n, p in model.named_parameters() if n.removesuffix(".weight") not in unit_params)
    return overhead + sum(model.get_submodule(m).bias.numel() * 2 for m in unit_params
                          if model.get_submodule(m).bias is not None)



def unit_weight(model: nn.Module, unit: Unit) -> torch.Tensor:
    """The unit's member weights stacked along the output dimension, fp32: (out, in)."""
    return torch.cat([model.get_submodule(m).weight.detach().to(torch.float32) for m in unit.members])


def quantized_candidates(W: torch.Tensor, H: torch.Tensor, unit: Unit, candidates: list[Candidate], costs: list[float],
                         config: QuantConfig, method):
    """Yield (candidate index, :class:`quant.quantizer.QuantizedWeight` (out, in)) for every quantized candidate that
    applies to ``unit`` (finite cost), each quantized from ``W`` by ``method`` with input Hessian ``H``."""
    for c, cand in enumerate(candidates):
        if cand.bits == 16 or not math.isfinite(costs[c]):
            continue
        spec = ModuleSpec(cand.bits, cand.group_size, config.sym)
        qw = solve(method, W, H if method.needs_hessian else None, spec, config, unit.name)  # rows split over processes
        yield c, qw


def member_weights(model: nn.Module, unit: Unit, W: torch.Tensor, dtype: torch.dtype = torch.float16
                   ) -> dict[str, torch.Tensor]:
    """Split a unit-shaped (out, in) weight back into its members, on the CPU in ``dtype``."""
    out, row = {}, 0
    for m in unit.members:
        rows = model.get_submodule(m).out_features
        out[m] = W[row : row + rows].to("cpu", dtype)
        row += rows
    return out


def member_codes(unit: Unit, qw) -> dict[str, torch.Tensor]:
    """A unit-shaped :class:`quant.quantizer.QuantizedWeight` split back into its members' codes and
    group parameters, ``<member>.intweight`` / ``.scales`` / ``.zeros`` / ``.g_idx``, on the CPU."""
    out, row = {}, 0
    for m, rows in zip(unit.members, unit.member_out):
        part = qw.rows(row, row + rows)
        row += rows
        for field in ("intweight", "scales", "zeros", "g_idx"):
            out[f"{m}.{field}"] = getattr(part, field).cpu().clone()  # members share g_idx: one copy each
    return out
