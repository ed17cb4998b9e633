"""Writing and reading hmq checkpoints: safetensors shards in the GPTQ layout plus a ``config.json``
whose ``quantization_config`` follows GPTQ's form (``dynamic`` carries per-module bit widths).

Export is kept apart from the runtime module swap (as gpt-fast does): ``save_quantized`` only reads
the model; ``load_quantized`` builds the module tree empty, swaps in :class:`QuantLinear` where the
checkpoint has packed tensors, and assigns the stored tensors. A checkpoint is written into a
temporary sibling folder and renamed into place, so a crash never leaves a half-written one.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .arch import decoder_layers, get_arch, set_submodule
from .config import ModuleSpec, QuantConfig
from .qlinear import QuantLinear
from .quantizer import group_count

HMQ_VERSION = "0.1.0"
FORMAT = "gptq"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read as asked; the message names the file or tensor."""


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless ``overwrite``; call before any expensive work."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise CheckpointError(f"output folder {str(out)!r} already exists: choose another --out or pass --overwrite.")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {str(out)!r} exists and is not a folder.")
    return out


def _module_specs(model: nn.Module, arch) -> dict[str, ModuleSpec | None]:
    specs = {}
    for i, layer in enumerate(decoder_layers(model, arch)):
        for n in arch.linears:
            m = layer.get_submodule(n)
            name = f"{arch.layers}.{i}.{n}"
            specs[name] = ModuleSpec(m.bits, m.group_size, m.sym) if isinstance(m, QuantLinear) else None
    return specs


def quantization_config(specs: dict[str, ModuleSpec | None], config: QuantConfig) -> dict:
    """GPTQ-style ``quantization_config``: the most common scheme at top level, others in ``dynamic``.

    ``dynamic`` keys are anchored regexes: ``+:`` overrides a module's scheme, ``-:`` keeps it
    unquantized (GPTQModel's convention, which transformers and vLLM follow).
    """
    quantized = [s for s in specs.values() if s is not None]
    base = Counter(quantized).most_common(1)[0][0] if quantized else ModuleSpec(config.bits, config.group_size, config.sym)
    dynamic = {}
    for name, spec in specs.items():
        pattern = "^" + re.escape(name) + "$"
        if spec is None:
            dynamic["-:" + pattern] = {}
        elif spec != base:
            dynamic["+:" + pattern] = {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym}
    qc = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": base.bits,
        "group_size": base.group_size,
        "sym": base.sym,
        "desc_act": config.act_order,
        "static_groups": config.static_groups,
        "true_sequential": config.true_sequential,
        "damp_percent": config.damp_percent,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"hmq:{HMQ_VERSION}"], "hmq_method": config.method},
    }
    if dynamic:
        qc["dynamic"] = dynamic
    return qc


def spec_from_quantization_config(qc: dict, name: str) -> ModuleSpec | None:
    """The scheme a GPTQ ``quantization_config`` gives module ``name`` (None: kept unquantized)."""
    fields = {"bits": qc.get("bits", 4), "group_size": qc.get("group_size", 128), "sym": qc.get("sym", True)}
    for key, override in (qc.get("dynamic") or {}).items():
        sign, pattern = (key[0], key[2:]) if key[:2] in ("+:", "-:") else ("+", key)
        if re.match(pattern, name):
            if sign == "-":
                return None
            fields.update({k: v for k, v in override.items() if k in fields})
    return ModuleSpec(**fields)


def _save_dtype(model: nn.Module) -> torch.dtype:
    """Floating tensors that stay unquantized are stored in the model's own half type, else fp16."""
    dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def save_quantized(model: nn.Module, tokenizer, out: str | Path, config: QuantConfig, *, overwrite: bool = False,
                   save_dtype: torch.dtype | None = None, max_shard_size: str = "4GB", extra: dict | None = None) -> Path:
    """Write ``model`` (already holding :class:`QuantLinear` modules) as a checkpoint folder ``out``."""
    from huggingface_hub import split_torch_state_dict_into_shards

    out = check_output_dir(out, overwrite)
    arch = get_arch(model.config.model_type)
    save_dtype = save_dtype or _save_dtype(model)
    specs = _module_specs(model, arch)

    state, seen = {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype)
        if t.device.type != "meta" and key in seen:  # tied weights (lm_head = embed_tokens) are stored once
            continue
        seen[key] = name
        if t.is_floating_point() and not name.endswith(".scales"):
            t = t.to(save_dtype)
        state[name] = t.detach().to("cpu").contiguous()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
        for filename, names in split.filename_to_tensors.items():
            save_file({n: state[n] for n in names}, tmp / filename, metadata={"format": "pt", "hmq": HMQ_VERSION})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        cfg = copy.deepcopy(model.config)
        cfg.quantization_config = quantization_config(specs, config)
        cfg.dtype = save_dtype
        cfg.use_cache = True
        cfg.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {"hmq_version": HMQ_VERSION, "quant_config": config.to_dict(),
                "modules": {n: (None if s is None else {"bits": s.bits, "group_size": s.group_size, "sym": s.sym})
                            for n, s in specs.items()}}
        meta.update(extra or {})
        (tmp / "hmq.json").write_text(json.dumps(meta, indent=2))
        _set_permissions(tmp)
        if out.exists():  # --overwrite: swap folders, then drop the old one
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _set_permissions(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; give the checkpoint the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def is_quantized_checkpoint(path: str | Path) -> bool:
    cfg = Path(path).expanduser() / "config.json"
    if not cfg.is_file():
        return False
    qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == "gptq"


def read_quantization_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{str(path)!r} is not a checkpoint folder: {cfg_file} is missing.")
    qc = json.loads(cfg_file.read_text()).get("quantization_config")
    if not qc or qc.get("quant_method") != "gptq":
        raise CheckpointError(f"{cfg_file} has no GPTQ quantization_config: is {str(path)!r} a quantized checkpoint?")
    if qc.get("checkpoint_format", "gptq") != "gptq":
        raise CheckpointError(f"{cfg_file}: checkpoint_format {qc.get('checkpoint_format')!r} is not supported (only 'gptq').")
    return qc


def shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} is missing shard(s) {missing}.")
    return [path / f for f in files]


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in shard_files(path):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    tensors[k] = fh.get_tensor(k)
        except Exception as exc:
            raise CheckpointError(f"cannot read shard {f}: {exc} (truncated or not a safetensors file?)") from None
    return tensors


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Rebuild a model saved by :func:`save_quantized` (or any GPTQ-layout checkpoint of a supported
    architecture): :class:`QuantLinear` where packed tensors are stored, plain modules elsewhere."""
    import transformers
    from accelerate import init_empty_weights

    transformers.logging.set_verbosity_error()
    path = Path(path).expanduser()
    qc = read_quantization_config(path)
    config = transformers.AutoConfig.from_pretrained(path)
    arch = get_arch(config.model_type)
    del config.quantization_config
    with init_empty_weights():  # parameters on the meta device; buffers such as rotary tables are real
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = read_tensors(path)
    for i, layer in enumerate(decoder_layers(model, arch)):
        for n in arch.linears:
            name = f"{arch.layers}.{i}.{n}"
            if f"{name}.qweight" not in tensors:
                continue
            linear = layer.get_submodule(n)
            spec = spec_from_quantization_config(qc, name)
            qweight, scales = tensors[f"{name}.qweight"], tensors[f"{name}.scales"]
            if spec is None:
                raise CheckpointError(f"{name}.qweight is stored but quantization_config keeps {name} unquantized.")
            bits = qweight.shape[0] * 32 // linear.in_features
            if bits != spec.bits or qweight.shape[1] != linear.out_features:
                raise CheckpointError(f"{name}.qweight has shape {tuple(qweight.shape)}, which does not match "
                                      f"{spec.bits}-bit weights of shape ({linear.out_features}, {linear.in_features}).")
            if scales.shape != (group_count(linear.in_features, spec.group_size), linear.out_features):
                raise CheckpointError(f"{name}.scales has shape {tuple(scales.shape)}, which does not match group size "
                                      f"{spec.group_size} for in_features={linear.in_features}.")
            q = QuantLinear(linear.in_features, linear.out_features, spec.bits, spec.group_size, spec.sym,
                            bias=linear.bias is not None, dtype=dtype, device="meta")
            set_submodule(layer, n, q)
    expected = set(model.state_dict())
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise CheckpointError(f"checkpoint {str(path)!r} holds tensors the model does not have: {unexpected[:5]}.")
    for name, t in tensors.items():
        if t.is_floating_point() and not name.endswith(".scales"):
            tensors[name] = t.to(dtype)
    model.load_state_dict(tensors, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks tensors {missing[:5]}{' …' if len(missing) > 5 else ''}.")
    model.eval()
    model.config.use_cache = False
    return model.to(device)
