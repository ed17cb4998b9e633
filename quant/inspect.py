"""What a checkpoint holds, from the safetensors headers alone: bits, group size and storage of
every linear in the decoder layers, and the bits per weight they average to (scales and zeros
included; ``g_idx`` left out, as it is derivable when act-order is off)."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from . import compressed
from .export import spec_from_quantization_config
from .loading import read_quantization_config, shard_files

DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "U8": 1, "I8": 1, "BOOL": 1}


def inspect_checkpoint(path: str | Path) -> dict:
    path = Path(path).expanduser()
    qc = read_quantization_config(path)
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in shard_files(path):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                shapes[k] = (tuple(sl.get_shape()), sl.get_dtype())
    nbytes = lambda k: DTYPE_BYTES.get(shapes[k][1], 4) * _numel(shapes[k][0])
    modules = {}
    ct = qc["quant_method"] == "compressed-tensors"
    ct_specs = compressed.specs_from_config(qc, [k[: -len(".weight_packed")] for k in shapes
                                                 if k.endswith(".weight_packed")]) if ct else {}
    for k in sorted(shapes):
        if k.endswith(".weight_packed"):
            name = k[: -len(".weight_packed")]
            spec = ct_specs[name]
            out_f, in_f = shapes[k][0][0], shapes[k][0][1] * 32 // spec.bits
            b = sum(nbytes(f"{name}.{t}") for t in ("weight_packed", "weight_scale", "weight_zero_point")
                    if f"{name}.{t}" in shapes)
            modules[name] = {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym,
                             "params": in_f * out_f, "bytes": b}
        elif k.endswith(".qweight"):
            name = k[: -len(".qweight")]
            spec = spec_from_quantization_config(qc, name)
            out_f = shapes[k][0][1]
            in_f = shapes[k][0][0] * 32 // spec.bits
            b = sum(nbytes(f"{name}.{t}") for t in ("qweight", "qzeros", "scales"))
            modules[name] = {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym,
                             "params": in_f * out_f, "bytes": b}
        elif k.endswith(".weight") and ".layers." in k and len(shapes[k][0]) == 2:
            name = k[: -len(".weight")]
            modules[name] = {"bits": 16, "group_size": None, "sym": None, "params": _numel(shapes[k][0]),
                             "bytes": _numel(shapes[k][0]) * 2}
    params = sum(m["params"] for m in modules.values())
    linear_bytes = sum(m["bytes"] for m in modules.values())
    file_bytes = sum(f.stat().st_size for f in shard_files(path))
    return {"path": str(path), "bpw": 8 * linear_bytes / max(1, params), "bytes": linear_bytes,
            "file_bytes": file_bytes, "params": params, "modules": modules,
            "quantization_config": {k: v for k, v in qc.items() if k not in ("dynamic", "config_groups", "ignore")}}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2)
