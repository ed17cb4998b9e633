"""Models that never sit whole in memory: a meta-device skeleton (accelerate's ``init_empty_weights``)
whose decoder layers are materialized one at a time from the safetensors shards on disk, read through
``safetensors.safe_open`` (memory-mapped), and released back to the meta device when the sweep moves on.

Everything outside the decoder layers (embeddings, final norm, ``lm_head``, rotary tables) is loaded
once on the CPU: for Llama-3-70B that is 4.2 GB of fp16, against 141 GB for the whole model.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from .conv1d import TransposedLinear
from .model_io import ModelLoadError

log = logging.getLogger("hmq")

STORE_ATTR = "hmq_store"  # the attribute of a streamed model that holds its ShardStore
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class StreamError(ModelLoadError):
    """A checkpoint folder cannot be streamed; the message says why and what to do."""


class ShardStore:
    """The tensors of a safetensors checkpoint folder by name, read lazily."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).resolve()
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise StreamError(f"{index} is not a safetensors index (no weight_map): {exc}") from None
        elif (self.folder / SINGLE).is_file():
            weight_map = None
        else:
            raise StreamError(f"{self.folder} holds no {SINGLE} or {INDEX}: only safetensors folders can be streamed.")
        if weight_map is None:
            from safetensors import safe_open

            with safe_open(self.folder / SINGLE, "pt") as f:
                weight_map = {k: SINGLE for k in f.keys()}
        self.files = {}
        for name in sorted(set(weight_map.values())):
            self.files[name] = shard_path(self.folder, name)
        self.weight_map = weight_map
        self._open: dict[str, object] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        shard = self.weight_map[name]
        if shard not in self._open:
            self._open[shard] = safe_open(self.files[shard], "pt")
        return self._open[shard].get_tensor(name)

    def strided(self, name: str, stride: int, count: int) -> torch.Tensor:
        """``tensor.reshape(-1)[::stride][:count]``, read through a memory map of the shard, so only
        the pages the sample touches are read, not the tensor."""
        import numpy as np

        path = self.files[self.weight_map[name]]
        if path not in self._headers:  # (header length, header): read once per shard, not once per tensor
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                self._headers[path] = (n, json.loads(f.read(n)))
        n, header = self._headers[path]
        entry = header[name]
        dtypes = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
                  "BF16": (np.uint16, torch.bfloat16)}
        if entry["dtype"] not in dtypes:
            return self.get(name).reshape(-1)[::stride][:count]
        np_dtype, dtype = dtypes[entry["dtype"]]
        start, end = entry["data_offsets"]
        flat = np.memmap(path, dtype=np_dtype, mode="r", offset=8 + n + start, shape=((end - start) // np.dtype(np_dtype).itemsize,))
        sample = torch.from_numpy(np.array(flat[::stride][:count]))
        del flat
        return sample.view(dtype) if dtype == torch.bfloat16 else sample

    def close(self) -> None:
        """Unmap the shards: pages read through the memory map count as the process's memory until then."""
        self._open.clear()


def shard_path(folder: Path, name: str) -> Path:
    """``folder / name``, refusing names that leave the folder (``../x``, absolute paths, links out)."""
    path = (folder / name).resolve()
    if Path(name).is_absolute() or folder.resolve() not in path.parents:
        raise StreamError(f"the shard index of {folder} names {name!r}, which lies outside the folder: the index is "
                          "damaged or hostile; re-download or re-save the model.")
    if not path.is_file():
        raise StreamError(f"the shard index of {folder} names {name!r}, which does not exist: the download is incomplete.")
    return path


def is_streamed(model: nn.Module) -> bool:
    return getattr(model, STORE_ATTR, None) is not None


def detach_store(model: nn.Module) -> None:
    """The model no longer streams: every layer is in memory now (a quantized model), so later sweeps
    keep what they find instead of dropping it back to the shards."""
    store = getattr(model, STORE_ATTR, None)
    if store is not None:
        store.close()
        setattr(model, STORE_ATTR, None)


def stored_sample(model: nn.Module, name: str, count: int = 4096) -> tuple[tuple[int, ...], torch.Tensor]:
    """(shape, ``w.reshape(-1)[::stride][:count]`` with ``stride = numel // count``) of linear
    ``name``'s weight: the sample a fingerprint hashes, read from the shards for a streamed model
    without reading the weight (a GPT-2 linear, stored transposed, is read whole and sampled as
    ``(out, in)``, so the sample is the same streamed or in memory)."""
    module = model.get_submodule(name)
    w = module.weight.detach()
    shape = tuple(w.shape)
    stride = max(1, w.numel() // count)
    if isinstance(module, TransposedLinear):  # the sample must not depend on how the checkpoint lays it out
        w = stored_weight(model, name)
    elif w.device.type == "meta" and is_streamed(model):
        store = getattr(model, STORE_ATTR)
        sample = store.strided(f"{name}.weight", stride, count).to(w.dtype)
        store.close()
        return shape, sample
    return shape, w.reshape(-1)[::stride][:count]


def stored_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight of linear ``name`` in the model's dtype: from memory, or, for a streamed model whose
    layer is on the meta device, read from its shards (one tensor, not the layer)."""
    module = model.get_submodule(name)
    w = module.weight.detach()
    if w.device.type == "meta" and is_streamed(model):
        store = getattr(model, STORE_ATTR)
        w = store.get(f"{name}.weight").to(w.dtype)
        store.close()
        if isinstance(module, TransposedLinear):
            w = w.t().contiguous()  # (out, in)
    return w


def _tensors(module: nn.Module, skip: str | None = None):
    """(local name, owner module, leaf) of every parameter and persistent buffer of ``module``, leaving
    out the submodule named ``skip`` (the decoder layers, when the rest of a model is loaded)."""
    for mname, sub in module.named_modules():
        if skip and (mname == skip or mname.startswith(skip + ".")):
            continue
        persistent = set(sub._buffers) - set(getattr(sub, "_non_persistent_buffers_set", ()))
        for leaf in [*sub._parameters, *sorted(persistent)]:
            if getattr(sub, leaf) is not None:
                yield (f"{mname}.{leaf}" if mname else leaf), sub, leaf


def materialize(module: nn.Module, prefix: str, store: ShardStore, device: torch.device | str = "cpu",
                skip: str | None = None, absent: frozenset = frozenset()) -> None:
    """Fill every meta tensor of ``module`` (full name ``prefix + local``) from ``store`` on ``device``,
    in the dtype the skeleton holds; tensors that are already real are only moved. ``absent`` names
    tensors that are allowed to be missing (tied weights the checkpoint stores once)."""
    for local, sub, leaf in _tensors(module, skip):
        t = getattr(sub, leaf)
        name = prefix + local
        if t.device.type != "meta":
            if t.device != torch.device(device):
                setattr(sub, leaf, nn.Parameter(t.to(device), requires_grad=False) if leaf in sub._parameters
                        else t.to(device))
            continue
        if name not in store:
            if name in absent:
                continue
            raise StreamError(f"{name} is not in the checkpoint {store.folder}: the folder does not match its "
                              "config.json (or stores this architecture under other names).")
        value = store.get(name).to(device=device, dtype=t.dtype if t.is_floating_point() else None)
        if isinstance(sub, TransposedLinear) and leaf == "weight":
            value = value.t().contiguous()  # (in, out) as Conv1D stores it -> (out, in)
        if value.shape != t.shape:
            raise StreamError(f"{name} has shape {tuple(value.shape)} in {store.folder} but the config says "
                              f"{tuple(t.shape)}: the folder does not match its config.json.")
        if leaf in sub._parameters:
            sub._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            sub._buffers[leaf] = value
    store.close()


def release(module: nn.Module) -> None:
    """Drop the fp parameters of ``module`` back to the meta device (they are read again from disk
    when needed). Buffers (rotary tables, the codes of quantized modules) move to the CPU."""
    for sub in module.modules():
        for leaf, p in list(sub._parameters.items()):
            if p is not None and p.device.type != "meta":
                sub._parameters[leaf] = nn.Parameter(p.to("meta"), requires_grad=False)
        for leaf, b in list(sub._buffers.items()):
            if b is not None and b.device.type not in ("meta", "cpu"):
                sub._buffers[leaf] = b.to("cpu")


def trim_heap() -> None:
    """Hand freed heap memory back to the OS. glibc keeps a freed layer's weights (each below its
    dynamic mmap threshold) in the heap, so without this the process grows by a layer's worth of
    fragments per layer swept (measured: +35 MB per 1024-wide layer) although nothing is held."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 (not glibc: AttributeError)
            # blocks of 4 MB and more come from mmap and go back to the OS when freed, instead of
            # glibc's heap, whose high-water mark otherwise creeps up over a long sweep
            _LIBC.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD (fixing it also stops its dynamic growth)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def load_skeleton(folder: str | Path, config, dtype: torch.dtype, arch) -> nn.Module | None:
    """The model of ``config`` with everything but its decoder layers loaded from ``folder`` on the
    CPU; the layers stay on the meta device until :func:`materialize` fills them. ``None`` (with a log
    line) when the folder cannot be streamed as it is: no safetensors, or tensor names that
    transformers renames while loading; the caller then loads the model whole. A damaged index
    (shards outside the folder, or missing) is refused, not handed to a whole-model loader."""
    import accelerate
    import transformers

    folder = Path(folder)
    if not (folder / INDEX).is_file() and not (folder / SINGLE).is_file():
        log.info("loading %s whole instead of streaming it: it holds no %s or %s", folder, SINGLE, INDEX)
        return None
    store = ShardStore(folder)
    with accelerate.init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers_path = arch.layers
    arch.adapt(model.get_submodule(layers_path))  # per-expert linears, named as the shards name them
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})  # target -> source
    missing = [n for n in model.state_dict() if n not in store and n not in tied]
    if missing:
        log.info("loading %s whole instead of streaming it: its checkpoint names differ from the model's (%s, ...)",
                 folder, missing[0])
        return None
    materialize(model, "", store, "cpu", skip=layers_path, absent=frozenset(t for t in tied if t not in store))
    for target, source in tied.items():  # lm_head.weight is embed_tokens.weight when the checkpoint stores it once
        if target not in store:
            owner, _, leaf = target.rpartition(".")
            model.get_submodule(owner)._parameters[leaf] = model.get_parameter(source)
    model.eval()
    model.config.use_cache = False
    setattr(model, STORE_ATTR, store)
    return model
