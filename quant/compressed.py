"""The compressed-tensors ``pack-quantized`` layout, as pure conversions to and from hmq's codes.

compressed-tensors (the format of llm-compressor, read by transformers and vLLM) stores a quantized
linear as:

- ``weight_packed`` (out, ceil(in*bits/32)) int32: the codes of each output row as one dense
  little-endian bit stream (code ``j`` at bits ``[j*bits, (j+1)*bits)``), the same stream
  :func:`quant.packing.pack_rows` writes. The stored value is the signed code plus ``2**(bits-1)``,
  which is hmq's unsigned code.
- ``weight_scale`` (out, n_groups) in the model's float type;
- ``weight_zero_point`` (ceil(out*bits/32), n_groups) int32, asymmetric schemes only: the signed zero
  ``zero - 2**(bits-1)`` packed the same way along the output axis (so the stored value is hmq's
  zero, not GPTQ v1's ``zero - 1``); symmetric schemes store none (zero fixed at ``2**(bits-1)``);
- ``weight_shape`` (2,) int64: (out, in).

Dequantization is ``(q - zp) * scale`` with signed ``q`` and ``zp``, which equals hmq's
``(code - zero) * scale``. compressed-tensors has no per-column group index any more (its
``actorder="group"`` was removed), so act-order checkpoints convert only with static groups.
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch

from .config import ModuleSpec
from .packing import pack_rows, unpack_rows
from .quantizer import QuantizedWeight, group_count

FORMAT = "pack-quantized"


class FormatError(ValueError):
    """A module cannot be written in, or read from, the compressed-tensors layout as it stands."""


def contiguous_groups(g_idx: torch.Tensor, group_size: int) -> bool:
    in_f = g_idx.numel()
    gs = in_f if group_size == -1 else group_size
    return torch.equal(g_idx.to(torch.int64).cpu(), torch.arange(in_f) // gs)


def to_compressed_tensors(qw: QuantizedWeight, name: str, scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized linear (names relative to the module)."""
    out_f, in_f = qw.shape
    if not contiguous_groups(qw.g_idx, qw.group_size):
        raise FormatError(f"{name} was quantized with act-order groups (a permuted g_idx), which compressed-tensors "
                          "cannot store: quantize with --act-order --static-groups or without --act-order, or "
                          "export --format gptq.")
    mid = 1 << (qw.bits - 1)
    if qw.sym and not bool((qw.zeros == mid).all()):
        raise FormatError(f"{name} is marked symmetric but its zero points are not all {mid}.")
    tensors = {
        "weight_packed": pack_rows(qw.intweight, qw.bits),
        "weight_scale": qw.scales.T.contiguous().to(scale_dtype),
        "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if not qw.sym:
        tensors["weight_zero_point"] = pack_rows(qw.zeros.to(torch.uint8), qw.bits).T.contiguous()
    return tensors


def from_compressed_tensors(tensors: dict[str, torch.Tensor], spec: ModuleSpec, name: str) -> QuantizedWeight:
    """Inverse of :func:`to_compressed_tensors`; bit-exact for checkpoints hmq wrote."""
    missing = [k for k in ("weight_packed", "weight_scale", "weight_shape") if k not in tensors]
    if not spec.sym and "weight_zero_point" not in tensors:
        missing.append("weight_zero_point")
    if missing:
        raise FormatError(f"{name} lacks {', '.join(name + '.' + k for k in missing)}.")
    out_f, in_f = (int(v) for v in tensors["weight_shape"].tolist())
    gs = in_f if spec.group_size == -1 else spec.group_size
    n_groups = group_count(in_f, spec.group_size)
    packed, scale = tensors["weight_packed"], tensors["weight_scale"]
    if tuple(packed.shape) != (out_f, in_f * spec.bits // 32) or tuple(scale.shape) != (out_f, n_groups):
        raise FormatError(f"{name}: weight_packed {tuple(packed.shape)} and weight_scale {tuple(scale.shape)} do not "
                          f"match {spec.bits}-bit weights of shape ({out_f}, {in_f}) in groups of {spec.group_size}.")
    if spec.sym:
        zeros = torch.full((n_groups, out_f), 1 << (spec.bits - 1), dtype=torch.int32)
    else:
        zp = tensors["weight_zero_point"]
        if tuple(zp.shape) != (out_f * spec.bits // 32, n_groups):
            raise FormatError(f"{name}.weight_zero_point has shape {tuple(zp.shape)}, expected "
                              f"({out_f * spec.bits // 32}, {n_groups}).")
        zeros = unpack_rows(zp.T.contiguous(), spec.bits, out_f).to(torch.int32)
    return QuantizedWeight(
        intweight=unpack_rows(packed, spec.bits, in_f),
        scales=scale.to(torch.float32).T.contiguous(),
        zeros=zeros,
        g_idx=(torch.arange(in_f) // gs).to(torch.int32),
        bits=spec.bits,
        group_size=spec.group_size,
        sym=spec.sym,
    )


def _weights_args(spec: ModuleSpec, act_order: bool) -> dict:
    return {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.sym,
        "strategy": "channel" if spec.group_size == -1 else "group",
        "group_size": None if spec.group_size == -1 else spec.group_size,
        "dynamic": False,
        "actorder": "weight" if act_order else None,
        "observer": "minmax",
    }


def compact_targets(names: list[str]) -> list[str]:
    """``re:`` patterns covering exactly ``names``: one per module path with the layer indices as an
    alternation (``re:^model\\.layers\\.(0|3)\\.mlp\\.down_proj$``)."""
    by_tail: dict[tuple[str, str], list[str]] = defaultdict(list)
    singles = []
    for n in names:
        m = re.match(r"^(.*?\.)(\d+)(\..+)$", n)
        if m:
            by_tail[(m.group(1), m.group(3))].append(m.group(2))
        else:
            singles.append(n)
    out = []
    for (head, tail), idx in sorted(by_tail.items()):
        alt = "|".join(sorted(idx, key=int))
        out.append(f"re:^{re.escape(head)}({alt}){re.escape(tail)}$")
    return out + sorted(singles)


def quantization_config(specs: dict[str, ModuleSpec | None], keep: list[str], act_order: bool,
                        aliases: dict[str, str] | None = None) -> dict:
    """A compressed-tensors ``quantization_config``: one config group per scheme, whose ``targets``
    name exactly its modules, and ``ignore`` for linears kept in floating point (and ``lm_head``).
    ``aliases``: other names a module's scheme is also looked up by (no module has them), which its
    group targets too."""
    by_scheme: dict[ModuleSpec, list[str]] = defaultdict(list)
    for name, spec in specs.items():
        if spec is not None:
            by_scheme[spec].append(name)
            if aliases and name in aliases:
                by_scheme[spec].append(aliases[name])
    groups = {}
    for i, (spec, names) in enumerate(sorted(by_scheme.items(), key=lambda kv: -len(kv[1]))):
        groups[f"group_{i}"] = {"targets": compact_targets(names), "weights": _weights_args(spec, act_order),
                                "input_activations": None, "output_activations": None, "format": FORMAT}
    kept = {n for n, s in specs.items() if s is None}
    ignore = sorted(set(keep) | kept | {aliases[n] for n in kept if aliases and n in aliases})
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }


def specs_from_config(qc: dict, names: list[str]) -> dict[str, ModuleSpec | None]:
    """Which scheme a compressed-tensors ``quantization_config`` gives each of ``names``."""
    if qc.get("format", FORMAT) != FORMAT:
        raise FormatError(f"compressed-tensors format {qc.get('format')!r} is not supported (only {FORMAT!r}).")
    ignore = qc.get("ignore") or []
    out: dict[str, ModuleSpec | None] = {}
    for name in names:
        out[name] = None
        if any(_match(name, t) for t in ignore):
            continue
        for gname, group in (qc.get("config_groups") or {}).items():
            if any(_match(name, t) or t == "Linear" for t in group.get("targets", [])):
                w = group.get("weights") or {}
                if w.get("type", "int") != "int" or group.get("input_activations"):
                    raise FormatError(f"config group {gname!r} is not weight-only integer quantization, which hmq "
                                      "does not run.")
                gs = -1 if w.get("strategy") == "channel" else int(w.get("group_size") or -1)
                out[name] = ModuleSpec(int(w["num_bits"]), gs, bool(w.get("symmetric", True)))
                break
    return out


def _match(name: str, target: str) -> bool:
    return re.match(target[3:], name) is not None if target.startswith("re:") else name == target
