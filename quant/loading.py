"""Reading hmq checkpoints back (:mod:`quant.export` writes them): the quantization config, the
tensors of every shard (SHA-256 digests verified, :mod:`quant.integrity`), and
:func:`load_quantized`, which builds the module tree empty, swaps in :class:`QuantLinear` where the
checkpoint has packed tensors (GPTQ or compressed-tensors layout) and assigns the stored tensors."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from . import compressed, integrity
from .arch import decoder_layers, get_arch, set_submodule
from .config import ModuleSpec
from .conv1d import transposed_names
from .export import CheckpointError, spec_from_quantization_config
from .packing import pack_gptq
from .qlinear import QuantLinear
from .quantizer import group_count


QUANT_METHODS = ("gptq", "compressed-tensors")


def is_quantized_checkpoint(path: str | Path) -> bool:
    cfg = Path(path).expanduser() / "config.json"
    if not cfg.is_file():
        return False
    qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") in QUANT_METHODS


def read_quantization_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{str(path)!r} is not a checkpoint folder: {cfg_file} is missing.")
    try:
        qc = json.loads(cfg_file.read_text()).get("quantization_config")
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({exc}).") from None
    if not qc or qc.get("quant_method") not in QUANT_METHODS:
        raise CheckpointError(f"{cfg_file} has no GPTQ or compressed-tensors quantization_config: is {str(path)!r} a "
                              "quantized checkpoint?")
    if qc["quant_method"] == "gptq" and qc.get("checkpoint_format", "gptq") != "gptq":
        raise CheckpointError(f"{cfg_file}: checkpoint_format {qc.get('checkpoint_format')!r} is not supported (only 'gptq').")
    if qc["quant_method"] == "compressed-tensors" and qc.get("format", compressed.FORMAT) != compressed.FORMAT:
        raise CheckpointError(f"{cfg_file}: compressed-tensors format {qc.get('format')!r} is not supported "
                              f"(only {compressed.FORMAT!r}).")
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


def _listed_digests(path: Path) -> dict[str, str] | None:
    """The shard digests hmq.json lists (None: not an hmq checkpoint, or one from before they were listed)."""
    meta_file = Path(path) / "hmq.json"
    try:
        listed = json.loads(meta_file.read_text()).get("shard_sha256") if meta_file.is_file() else None
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"{meta_file} is not valid JSON: the checkpoint was damaged; re-export it.") from None
    return listed if isinstance(listed, dict) else None


def read_tensors(path: Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint; with ``verify``, each shard is checked against its SHA-256 digests."""
    tensors = {}
    listed = _listed_digests(path) if verify else None
    for f in shard_files(path):
        try:
            with safe_open(str(f), framework="pt") as fh:
                metadata = fh.metadata()
                shard = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:
            raise CheckpointError(f"cannot read shard {f}: {exc} (truncated or not a safetensors file?)") from None
        if verify:
            problem = integrity.verify(str(f), shard, metadata) or integrity.against_listing(f, metadata, listed)
            if problem:
                raise CheckpointError(problem + " Re-export it, or pass --no-verify to load it anyway.")
        tensors.update(shard)
    for name, t in tensors.items():
        if name.endswith((".scales", ".weight_scale")) and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{name} in {str(path)!r} holds NaN or Inf scales: the checkpoint is corrupt.")
    return tensors


def _compressed_to_gptq(tensors: dict[str, torch.Tensor], qc: dict, names: list[str]) -> dict:
    """Replace each compressed-tensors module's tensors by the GPTQ tensors hmq's QuantLinear holds;
    returns the scheme of every name (None: not quantized)."""
    specs = compressed.specs_from_config(qc, names)
    for name, spec in specs.items():
        keys = [k for k in tensors if k.startswith(name + ".weight_")]
        if spec is None or not keys:
            if spec is not None:
                raise CheckpointError(f"quantization_config quantizes {name} but the checkpoint has no "
                                      f"{name}.weight_packed.")
            continue
        parts = {k[len(name) + 1:]: tensors.pop(k) for k in keys}
        try:
            qw = compressed.from_compressed_tensors(parts, spec, name)
        except compressed.FormatError as exc:
            raise CheckpointError(str(exc)) from None
        if bool((qw.zeros < 1).any()):
            raise CheckpointError(f"{name} has zero points of 0, which hmq's GPTQ-layout modules cannot hold.")
        tensors.update({f"{name}.{k}": v for k, v in pack_gptq(qw).items()})
    return specs


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   verify: bool = True):
    """Rebuild a model saved by :func:`save_quantized` (or any GPTQ or compressed-tensors
    pack-quantized checkpoint of a supported architecture): :class:`QuantLinear` where packed
    tensors are stored, plain modules elsewhere."""
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
    arch.adapt(decoder_layers(model, arch))  # GPT-2's Conv1D, fused experts: plain linears, as hmq quantized them
    tensors = read_tensors(path, verify)
    layouts = [arch.at(layer) for layer in decoder_layers(model, arch)]
    names = [f"{arch.layers}.{i}.{n}" for i, here in enumerate(layouts) for n in here.linears]
    ct_specs = _compressed_to_gptq(tensors, qc, names) if qc["quant_method"] == "compressed-tensors" else None
    for i, layer in enumerate(decoder_layers(model, arch)):
        for n in layouts[i].linears:
            name = f"{arch.layers}.{i}.{n}"
            if f"{name}.qweight" not in tensors:
                continue
            linear = layer.get_submodule(n)
            spec = ct_specs[name] if ct_specs is not None else spec_from_quantization_config(qc, name)
            if spec is None:
                raise CheckpointError(f"{name}.qweight is stored but quantization_config keeps {name} unquantized.")
            _check_module_shapes(tensors, name, spec, linear.in_features, linear.out_features)
            q = QuantLinear(linear.in_features, linear.out_features, spec.bits, spec.group_size, spec.sym,
                            bias=linear.bias is not None, dtype=dtype, device="meta")
            set_submodule(layer, n, q)
    expected = set(model.state_dict())
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise CheckpointError(f"checkpoint {str(path)!r} holds tensors the model does not have: {unexpected[:5]}.")
    transposed = transposed_names(model)
    for name, t in tensors.items():
        if t.is_floating_point() and not name.endswith(".scales"):
            tensors[name] = t.to(dtype)
        if name in transposed:
            tensors[name] = tensors[name].t().contiguous()  # Conv1D's (in, out) -> (out, in)
    model.load_state_dict(tensors, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks tensors {missing[:5]}{' …' if len(missing) > 5 else ''}.")
    model.eval()
    model.config.use_cache = False
    return model.to(device)


def _check_module_shapes(tensors: dict, name: str, spec: ModuleSpec, in_f: int, out_f: int) -> None:
    """Every packed tensor of ``name`` must have the shape its scheme and the model's linear imply."""
    n_groups = group_count(in_f, spec.group_size)
    expected = {"qweight": (in_f * spec.bits // 32, out_f), "qzeros": (n_groups, out_f * spec.bits // 32),
                "scales": (n_groups, out_f), "g_idx": (in_f,)}
    for leaf, shape in expected.items():
        t = tensors.get(f"{name}.{leaf}")
        if t is None:
            raise CheckpointError(f"{name}.{leaf} is missing from the checkpoint.")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{name}.{leaf} has shape {tuple(t.shape)}, but the config's {spec.bits}-bit, "
                                  f"group {spec.group_size} scheme for a ({out_f}, {in_f}) linear needs {shape}: the "
                                  "config and the tensors disagree.")
