"""`hmq export`: rewrite a quantized checkpoint (hmq's or another tool's) in the GPTQ or
compressed-tensors layout, bit for bit, checked for the target engine."""
from __future__ import annotations

import json
from pathlib import Path

from .config import QuantConfig
from .export import check_output_dir, save_quantized
from .loading import load_quantized, read_quantization_config

_NOT_CARRIED = ("hmq_version", "format", "engine", "quant_config", "shard_sha256", "modules")


def source_config(src: Path, meta: dict) -> QuantConfig:
    """The run's settings from ``hmq.json``, or a foreign checkpoint's top-level scheme."""
    if "quant_config" in meta:
        return QuantConfig.from_dict(meta["quant_config"])
    qc = read_quantization_config(src)
    weights = next(iter((qc.get("config_groups") or {}).values()), {}).get("weights", {})
    return QuantConfig(bits=int(qc.get("bits", weights.get("num_bits", 4))),
                       group_size=int(qc.get("group_size", weights.get("group_size") or -1)),
                       sym=bool(qc.get("sym", weights.get("symmetric", True))),
                       act_order=bool(qc.get("desc_act", False)), static_groups=False)


def convert_checkpoint(path: str | Path, out: str | Path, fmt: str, engine: str, *, verify: bool = True,
                       overwrite: bool = False) -> tuple[Path, int]:
    """Write the checkpoint at ``path`` to ``out`` in ``fmt``; returns (out, quantized linears)."""
    src = Path(path).expanduser()
    out = check_output_dir(out, overwrite)
    read_quantization_config(src)  # a folder that is not a quantized checkpoint fails here, clearly
    meta_file = src / "hmq.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    config = source_config(src, meta)
    model = load_quantized(src, verify=verify)
    tokenizer = None
    if (src / "tokenizer_config.json").is_file():
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    extra = {k: v for k, v in meta.items() if k not in _NOT_CARRIED} | {"exported_from": str(src)}
    save_quantized(model, tokenizer, out, config, overwrite=overwrite, extra=extra, fmt=fmt, engine=engine)
    n = sum(1 for v in json.loads((out / "hmq.json").read_text())["modules"].values() if v)
    return out, n
