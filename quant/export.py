"""Writing hmq checkpoints (:mod:`quant.loading` reads them back): safetensors shards plus a ``config.json`` whose
``quantization_config`` real loaders read, in one of two layouts:

- ``gptq``: GPTQ's tensors (v1 zero points) and config, ``dynamic`` carrying per-module bit widths
  (GPTQModel, transformers through GPTQModel, vLLM);
- ``compressed-tensors``: the ``pack-quantized`` layout of :mod:`quant.compressed` (transformers
  through compressed-tensors, vLLM).

Engines differ in what they run; :func:`check_engine` refuses, at export, a checkpoint the target
engine would reject or misread at serving time. Every shard carries SHA-256 digests of its tensors
(:mod:`quant.integrity`), verified on load.

Export is kept apart from the runtime module swap (as gpt-fast does): ``save_quantized`` only reads
the model; ``load_quantized`` builds the module tree empty, swaps in :class:`QuantLinear` where the
checkpoint has packed tensors, and assigns the stored tensors. A checkpoint is written into a
temporary sibling folder and renamed into place, so a crash never leaves a half-written one.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from . import compressed, integrity
from .arch import Arch, decoder_layers, get_arch
from .conv1d import transposed_names
from .config import ModuleSpec, QuantConfig
from .moe import expert_block
from .qlinear import QuantLinear

HMQ_VERSION = "0.1.0"
FORMAT = "gptq"
FORMATS = ("gptq", "compressed-tensors")


@dataclass(frozen=True)
class EngineRule:
    """What one engine loads in one format (checked on export, documented in the README)."""

    bits: tuple[int, ...]
    asym: bool  # asymmetric (zero-point) grids load correctly
    per_module: bool  # decoder linears may differ in scheme, or stay in floating point
    fused: bool  # q/k/v and gate/up run as one matmul, so each group needs one scheme
    note: str


ENGINE_RULES: dict[tuple[str, str], EngineRule] = {
    ("vllm", "gptq"): EngineRule((2, 3, 4, 8), True, True, True,
                                 "Marlin for 4/8-bit symmetric, GPTQ kernels otherwise; `dynamic` per module"),
    ("vllm", "compressed-tensors"): EngineRule((4, 8), True, True, True,
                                               "WNA16 (Marlin); asymmetric needs a vLLM with zero-point WNA16"),
    ("transformers", "gptq"): EngineRule((2, 3, 4, 8), True, False, False,
                                         "through GPTQModel + optimum, which ignore `dynamic`: one scheme for all"),
    ("transformers", "compressed-tensors"): EngineRule((2, 3, 4, 8), False, True, False,
                                                       "dense after load; asymmetric zero points fail to load"),
    ("gptqmodel", "gptq"): EngineRule((2, 3, 4, 8), False, True, False,
                                      "GPTQModel.load refuses asymmetric v1 checkpoints other tools wrote"),
    ("hmq", "gptq"): EngineRule((2, 3, 4, 8), True, True, False, "hmq's QuantLinear"),
    ("hmq", "compressed-tensors"): EngineRule((2, 3, 4, 8), True, True, False, "hmq's QuantLinear"),
}
ENGINES = tuple(dict.fromkeys(e for e, _ in ENGINE_RULES))


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read as asked; the message names the file or tensor."""


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless ``overwrite``; call before any expensive work."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise CheckpointError(f"output folder {str(out)!r} already exists: choose another --out or pass --overwrite.")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {str(out)!r} exists and is not a folder.")
    if out.exists() and any(out.iterdir()) and not (out / "hmq.json").is_file():
        raise CheckpointError(f"--overwrite replaces only hmq checkpoints, and {str(out)!r} is not one (no hmq.json "
                              "in it): choose another --out, or delete that folder yourself if you mean to.")
    check_writable(out)
    return out


def check_writable(path: Path) -> None:
    """Refuse a ``path`` whose nearest existing folder cannot be written (found now, not after the work)."""
    parent = Path(path).expanduser().absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {str(path)!r}: {str(parent)!r} is not a writable folder; choose an "
                              "output path in a folder you can write.")


def _module_specs(model: nn.Module, arch) -> dict[str, ModuleSpec | None]:
    specs = {}
    for i, layer in enumerate(decoder_layers(model, arch)):
        for n in arch.at(layer).linears:
            m = layer.get_submodule(n)
            name = f"{arch.layers}.{i}.{n}"
            specs[name] = ModuleSpec(m.bits, m.group_size, m.sym) if isinstance(m, QuantLinear) else None
    return specs


def _layouts(specs: dict, arch: Arch) -> dict[str, Arch]:
    """Decoder-layer index (as a string) -> the layout of that layer, from the linear names in ``specs``."""
    prefix, tails = arch.layers + ".", {}
    for name in specs:
        if name.startswith(prefix):
            layer, _, tail = name[len(prefix):].partition(".")
            tails.setdefault(layer, set()).add(tail)
    return {layer: arch.at(names) for layer, names in tails.items()}


def _expert_blocks(specs: dict, arch: Arch) -> dict[str, list[str]]:
    """``model.layers.3.mlp.experts`` -> the full names of its experts' linears (MoE architectures)."""
    blocks: dict[str, list[str]] = {}
    if arch.experts is not None:
        for name in specs:
            block = expert_block(name)
            if block and name.startswith(arch.layers + "."):
                blocks.setdefault(block, []).append(name)
    return blocks


def _vllm_expert_aliases(specs: dict, arch: Arch) -> dict[str, str]:
    """Mixtral's expert linears (``experts.3.w1``) under the names vLLM's compressed-tensors MoE
    method looks a fused-experts module's scheme up by (``experts.0.gate_proj``, up, down)."""
    if arch.experts is None:
        return {}
    generic = dict(zip(arch.experts.linears, ("gate_proj", "up_proj", "down_proj")))
    aliases = {}
    for members in _expert_blocks(specs, arch).values():
        for name in members:
            head, _, leaf = name.rpartition(".")
            if generic.get(leaf, leaf) != leaf:
                aliases[name] = f"{head}.{generic[leaf]}"
    return aliases


def _rule_targets(specs: dict[str, ModuleSpec | None], arch: Arch | None) -> list[tuple[str, list[str]]]:
    """(anchored regex, modules it covers) for per-module rules. A fused group whose members share one
    scheme gets one rule that also matches vLLM's fused name (``qkv_proj``, ``gate_up_proj``), which
    is the name vLLM looks its rules up by; so do a MoE block's experts when they all share one (vLLM
    looks the whole fused-experts module up as ``...mlp.experts``)."""
    rules, done = [], set()
    if arch is not None:
        for block, members in _expert_blocks(specs, arch).items():
            if len({specs[m] for m in members}) == 1:
                leaves = "|".join(re.escape(n) for n in arch.experts.linears)
                rules.append((f"^{re.escape(block)}(\\.\\d+\\.({leaves}))?$", members))
                done.update(members)
        layouts = _layouts(specs, arch)
        prefix = arch.layers + "."
        for name in specs:
            if not name.startswith(prefix):
                continue
            layer, _, tail = name[len(prefix):].partition(".")
            here = layouts[layer]
            groups = [(g, f) for g, f in zip(here.fused, here.fused_names) if f] if here.fused_names else []
            for members, fused_name in groups:
                full = [f"{prefix}{layer}.{m}" for m in members]
                if tail in members and full[0] not in done and all(f in specs for f in full) \
                        and len({specs[f] for f in full}) == 1:
                    parent = fused_name.rpartition(".")[0]
                    alts = "|".join(m.rpartition(".")[2] for m in members) + "|" + fused_name.rpartition(".")[2]
                    head = re.escape(f"{prefix}{layer}.{parent}.") if parent else re.escape(f"{prefix}{layer}.")
                    rules.append((f"^{head}({alts})$", full))
                    done.update(full)
    for name in specs:
        if name not in done:
            rules.append(("^" + re.escape(name) + "$", [name]))
    return rules


def quantization_config(specs: dict[str, ModuleSpec | None], config: QuantConfig, arch: Arch | None = None) -> dict:
    """GPTQ-style ``quantization_config``: the most common scheme at top level, others in ``dynamic``.

    ``dynamic`` keys are anchored regexes: ``+:`` overrides a module's scheme, ``-:`` keeps it
    unquantized (GPTQModel's convention, which transformers and vLLM follow).
    """
    quantized = [s for s in specs.values() if s is not None]
    base = Counter(quantized).most_common(1)[0][0] if quantized else ModuleSpec(config.bits, config.group_size, config.sym)
    dynamic = {}
    for pattern, names in _rule_targets(specs, arch):
        spec = specs[names[0]]
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
        # desc_act tells loaders to follow a permuted g_idx; static groups keep it contiguous, so kernels skip it
        "desc_act": config.act_order and not config.static_groups,
        "static_groups": config.static_groups,
        "true_sequential": config.true_sequential,
        "damp_percent": config.damp_percent,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"hmq:{HMQ_VERSION}"], "hmq_method": config.method},
    }
    if arch is not None:
        steps: list[dict] = []  # step k over every layer's layout (MoE models: experts per layer)
        for here in _layouts(specs, arch).values():
            for k, step in enumerate(here.sequential):
                if k == len(steps):
                    steps.append({})
                steps[k].update(dict.fromkeys(step))
        qc["modules_in_block_to_quantize"] = [list(step) for step in steps]
    if dynamic:
        qc["dynamic"] = dynamic
    return qc


def check_engine(specs: dict[str, ModuleSpec | None], arch: Arch, fmt: str, engine: str) -> None:
    """Refuse a checkpoint ``engine`` would reject or misread as ``fmt``, naming the modules and the fix."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    if (engine, fmt) not in ENGINE_RULES:
        known = sorted({f"{e} ({f})" for e, f in ENGINE_RULES})
        raise CheckpointError(f"engine {engine!r} does not load {fmt} checkpoints; known engines: {', '.join(known)}.")
    rule = ENGINE_RULES[(engine, fmt)]
    quantized = {n: s for n, s in specs.items() if s is not None}
    problems = []
    wrong = sorted(n for n, s in quantized.items() if s.bits not in rule.bits)
    if wrong:
        problems.append(f"it runs {'/'.join(map(str, rule.bits))}-bit weights only, but {len(wrong)} module(s) "
                        f"have other widths (e.g. {wrong[0]}: {quantized[wrong[0]].bits} bits)"
                        + ("; vLLM runs 2/3-bit weights from --format gptq" if engine == "vllm" else ""))
    asym = sorted(n for n, s in quantized.items() if not s.sym)
    if asym and not rule.asym:
        problems.append(f"it does not load asymmetric grids (e.g. {asym[0]}): quantize with --sym")
    if not rule.per_module and (len(set(quantized.values())) > 1 or len(quantized) < len(specs)):
        problems.append("it needs one scheme for every decoder linear, but this checkpoint mixes "
                        f"{len(set(quantized.values()))} schemes and keeps {len(specs) - len(quantized)} linear(s) in "
                        "floating point: export --format compressed-tensors (transformers) or target gptqmodel/vllm")
    if rule.fused:
        prefix = arch.layers + "."
        layouts = _layouts(specs, arch)
        for i in sorted(layouts, key=int):
            bad = [members for members in layouts[i].fused if len({specs.get(f"{prefix}{i}.{m}") for m in members}) > 1]
            if bad:
                desc = ", ".join(f"{m.rpartition('.')[2]}={_spec_label(specs.get(f'{prefix}{i}.{m}'))}" for m in bad[0])
                problems.append(f"it runs {'/'.join(m.rpartition('.')[2] for m in bad[0])} as one matmul with one "
                                f"scheme, but in layer {i} they differ ({desc}): allocate with fused units (the default "
                                "--units fused)")
                break
    if engine == "vllm":
        for block, members in _expert_blocks(specs, arch).items():
            if len({specs[m] for m in members}) > 1:
                problems.append(f"it runs all experts of a MoE block as one fused module with one scheme, but the "
                                f"experts of {block} differ (e.g. {_spec_label(specs[members[0]])} and "
                                f"{_spec_label(next(specs[m] for m in members if specs[m] != specs[members[0]]))}): "
                                "give every expert of a layer one scheme, or export for gptqmodel or transformers")
                break
    if arch.conv1d and engine == "transformers":
        problems.append("transformers builds this architecture's linears as Conv1D modules, which its quantized "
                        "loaders do not replace")
    if problems:
        raise CheckpointError(f"{engine} would not load this checkpoint as {fmt}: " + "; ".join(problems)
                              + f". (Pick another engine with --engine {{{','.join(ENGINES)}}}.)")


def _spec_label(spec: ModuleSpec | None) -> str:
    return "16" if spec is None else f"w{spec.bits}g{spec.group_size}{'' if spec.sym else 'a'}"


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


def _state(model: nn.Module, save_dtype: torch.dtype, fmt: str) -> dict[str, torch.Tensor]:
    """The tensors to store: tied weights once, floats in ``save_dtype``, packed modules in ``fmt``."""
    quant = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    packed = {"qweight", "qzeros", "scales", "g_idx"}
    transposed = transposed_names(model)  # kept GPT-2 linears go back to Conv1D's (in, out)
    state, seen = {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype)
        if t.device.type != "meta" and key in seen:  # tied weights (lm_head = embed_tokens) are stored once
            continue
        seen[key] = name
        owner, _, leaf = name.rpartition(".")
        if fmt != "gptq" and owner in quant and leaf in packed:
            continue
        if t.is_floating_point() and not name.endswith(".scales"):
            t = t.to(save_dtype)
        state[name] = (t.t() if name in transposed else t).detach().to("cpu").contiguous()
    if fmt == "compressed-tensors":
        for name, m in quant.items():
            try:
                cts = compressed.to_compressed_tensors(m.unpack(), name, save_dtype)
            except compressed.FormatError as exc:
                raise CheckpointError(str(exc)) from None
            state.update({f"{name}.{k}": v.to("cpu") for k, v in cts.items()})
    return state


def save_quantized(model: nn.Module, tokenizer, out: str | Path, config: QuantConfig, *, overwrite: bool = False,
                   save_dtype: torch.dtype | None = None, max_shard_size: str = "4GB", extra: dict | None = None,
                   fmt: str = "gptq", engine: str = "hmq") -> Path:
    """Write ``model`` (already holding :class:`QuantLinear` modules) as a checkpoint folder ``out``
    in layout ``fmt``, refusing what ``engine`` could not serve (see :func:`check_engine`)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    out = check_output_dir(out, overwrite)
    arch = get_arch(model.config.model_type)
    save_dtype = save_dtype or _save_dtype(model)
    specs = _module_specs(model, arch)
    check_engine(specs, arch, fmt, engine)
    _check_finite_scales(model)
    state = _state(model, save_dtype, fmt)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
        digests = {}
        for filename, names in split.filename_to_tensors.items():
            shard = {n: state[n] for n in names}
            meta = integrity.shard_metadata(shard)
            digests[filename] = meta[integrity.SHARD_KEY]
            save_file(shard, tmp / filename, metadata={"format": "pt", "hmq": HMQ_VERSION, **meta})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        cfg = copy.deepcopy(model.config)
        if fmt == "gptq":
            cfg.quantization_config = quantization_config(specs, config, arch)
        else:
            keep = ["lm_head"] if isinstance(getattr(model, "lm_head", None), nn.Linear) else []
            cfg.quantization_config = compressed.quantization_config(specs, keep, config.act_order,
                                                                     _vllm_expert_aliases(specs, arch))
        cfg.dtype = save_dtype
        cfg.use_cache = True
        cfg.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {"hmq_version": HMQ_VERSION, "format": fmt, "engine": engine, "quant_config": config.to_dict(),
                "shard_sha256": digests,
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


def _check_finite_scales(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and not bool(torch.isfinite(m.scales).all()):
            raise CheckpointError(f"{name}.scales holds NaN or Inf: the quantization of {name} failed; re-run with a "
                                  "higher --damp-percent or keep the module at 16 bits.")


def _set_permissions(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; give the checkpoint the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


_READERS = ("QUANT_METHODS", "is_quantized_checkpoint", "read_quantization_config", "shard_files", "read_tensors",
            "load_quantized")


def __getattr__(name: str):
    """The readers moved to :mod:`quant.loading`; ``from quant.export import load_quantized`` still works."""
    if name in _READERS:
        from . import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
