"""The loss of *variants* of a model, each differing from a reference in a few weights, on the engine.

Measurement (the loss change of one unit, a pair, or one unit in context) and the search (the loss of
a configuration near the best so far) both ask the same question many times: the mean NLL of the
model with some weights replaced. A variant is computed from the first decoder layer it changes; the
layers in front are replayed from the reference's stored boundary activations. Variants that start
at the same layer share one visit of each later layer (:func:`quant.engine.visit`), so a streamed
model reads each layer once per start layer, not once per variant.

Candidate weights (one copy per width and unit) live in a :class:`WeightCache`: safetensors files in
a cache folder on disk, read back one layer's worth at a time, never a model copy per candidate in RAM.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import weakref
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import dist
from .arch import Arch, decoder_layers
from .capture import LayerInput, capture_layer_inputs, run_layer
from .engine import head_blocks, head_logits, head_on, visit

Swap = dict[str, torch.Tensor]  # full linear name -> weight (out, in)


def cache_root() -> Path:
    from .model_io import data_dir

    return data_dir() / "work"


def _save_whole(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``tensors`` to the safetensors file ``path`` by a temporary name and a rename: a file there is always whole."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


class WeightCache:
    """``(unit, candidate) -> {member name: weight}`` kept on disk: :meth:`put` buffers, :meth:`flush`
    writes the buffer as one safetensors file (call it once per decoder layer), :meth:`get` reads one
    entry back. Without ``folder``, a new folder under ``~/.cache/hmq/work``, removed by :meth:`close`
    (and, should the process die first, by the next cache made on this host). A given ``folder`` (a
    resume state's) is kept: :meth:`adopt` takes back the files an earlier start wrote there."""

    def __init__(self, folder: str | Path | None = None):
        self.owned = folder is None
        if self.owned:
            root = cache_root()
            root.mkdir(parents=True, exist_ok=True)
            _remove_orphans(root)
            folder = tempfile.mkdtemp(prefix=f"{_ORPHAN_PREFIX}{os.getpid()}-", dir=root)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._buffer: dict[str, torch.Tensor] = {}
        self._where: dict[tuple[int, int], tuple[Path | None, tuple[str, ...]]] = {}
        self._files = 0

    @staticmethod
    def _key(k: int, c: int, member: str) -> str:
        return f"{k}/{c}/{member}"

    def put(self, k: int, c: int, weights: Swap) -> None:
        for m, w in weights.items():
            self._buffer[self._key(k, c, m)] = w.detach().to("cpu").contiguous()
        self._where[(k, c)] = (None, tuple(weights))

    def flush(self, name: str | None = None) -> None:
        """Write the buffered entries to one file (``name``.safetensors; default: numbered), by a
        temporary name and a rename, so a file there is always whole."""
        if not self._buffer:
            return
        path = self.folder / f"{name or f'{self._files:05d}'}.safetensors"
        _save_whole(self._buffer, path)
        self._files += 1
        for kc, (where, members) in self._where.items():
            if where is None:
                self._where[kc] = (path, members)
        self._buffer = {}

    def adopt(self, name: str) -> None:
        """Index the entries of file ``name``.safetensors in the folder, if an earlier start wrote it."""
        path = self.folder / f"{name}.safetensors"
        if not path.is_file():
            return  # that layer cached nothing
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        members: dict[tuple[int, int], list[str]] = {}
        for key in keys:
            k, c, m = key.split("/", 2)
            members.setdefault((int(k), int(c)), []).append(m)
        for kc, ms in members.items():
            self._where[kc] = (path, tuple(ms))

    def __contains__(self, kc) -> bool:
        return tuple(kc) in self._where

    def __iter__(self):
        return iter(self._where)

    def get(self, kc, default=None) -> Swap | None:
        kc = tuple(kc)
        if kc not in self._where:
            return default
        path, members = self._where[kc]
        if path is None:
            return {m: self._buffer[self._key(*kc, m)] for m in members}
        with safe_open(str(path), framework="pt") as f:
            return {m: f.get_tensor(self._key(*kc, m)) for m in members}

    def __getitem__(self, kc) -> Swap:
        out = self.get(kc)
        if out is None:
            raise KeyError(kc)
        return out

    def close(self) -> None:
        self._buffer, self._where = {}, {}
        if self.owned:
            shutil.rmtree(self.folder, ignore_errors=True)


class Boundaries:
    """Layer-boundary activations, a list kept on disk: one safetensors file per boundary in a cache
    folder (removed when the list goes away, or by the next cache made on this host should the process
    die first), only the last one appended also in RAM. A model's depth costs disk, not memory: at 70B
    with 8 × 512 windows the 81 boundaries take 11 GB. ``len``, ``[i]`` (negative too), ``append`` and
    :meth:`truncate`."""

    def __init__(self):
        root = cache_root()
        root.mkdir(parents=True, exist_ok=True)
        _remove_orphans(root)
        self.folder = Path(tempfile.mkdtemp(prefix=f"{_ORPHAN_PREFIX}{os.getpid()}-", dir=root))
        weakref.finalize(self, shutil.rmtree, str(self.folder), True)
        self._n = 0
        self._last: torch.Tensor | None = None

    def __len__(self) -> int:
        return self._n

    def _path(self, i: int) -> Path:
        return self.folder / f"{i}.safetensors"

    def append(self, x: torch.Tensor) -> None:
        x = x.detach().cpu().contiguous()
        _save_whole({"x": x}, self._path(self._n))  # a new file: a tensor read from the old one (memory-mapped) keeps its values
        self._n, self._last = self._n + 1, x

    def __getitem__(self, i: int) -> torch.Tensor:
        i = range(self._n)[i]  # an IndexError past the end, as a list's
        return self._last if i == self._n - 1 else load_file(str(self._path(i)))["x"]

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` boundaries."""
        if n < self._n:
            self._n = n
            self._last = load_file(str(self._path(n - 1)))["x"] if n else None


# then the pid of the process that made it; "_" after the host, so host "gpu" never takes "gpu-3"'s folders
_ORPHAN_PREFIX = f"weights-{socket.gethostname()}_"


def _remove_orphans(root: Path) -> None:
    """Remove the cache folders of processes on this host that died before closing them."""
    for folder in root.glob(f"{_ORPHAN_PREFIX}*"):
        pid = folder.name.removeprefix(_ORPHAN_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


@contextlib.contextmanager
def swapped(layer: nn.Module, prefix: str, swap: Swap):
    """The linears of ``layer`` named in ``swap`` (full names starting with ``prefix``) use its weights
    for the duration."""
    old = []
    for name, w in swap.items():
        if name.startswith(prefix):
            lin = layer.get_submodule(name.removeprefix(prefix))
            old.append((lin, lin.weight.data))
            lin.weight.data = w.to(lin.weight.device, lin.weight.dtype)
    try:
        yield
    finally:
        for lin, w in old:
            lin.weight.data = w


@torch.no_grad()
def head_nll(model: nn.Module, arch: Arch, hidden: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token NLL of ``ids`` (b, seq) from the last decoder layer's output ``hidden``
    (b, seq, hidden), the head run a block of positions at a time (:func:`quant.engine.head_blocks`)."""
    device = model.get_output_embeddings().weight.device
    total = 0.0
    for w, a, b in head_blocks(ids.shape[0], ids.shape[1] - 1):
        logits = head_logits(model, arch, hidden[w, a:b].to(device)).float()  # (windows, b-a, vocab)
        total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   ids[w, a + 1 : b + 1].reshape(-1).to(logits.device), reduction="sum"))
    return total


class Reference:
    """A model's boundary activations on ``ids`` (n, seq), one batch: ``inputs[i]`` is what decoder
    layer ``i`` receives, ``inputs[L]`` the last layer's output, with ``swap`` applied (the fp model
    when empty). Boundaries are kept on disk (:class:`Boundaries`), so RAM does not grow with depth."""

    def __init__(self, model: nn.Module, arch: Arch, ids: torch.Tensor, device: torch.device):
        self.model, self.arch, self.device = model, arch, device
        self.ids = ids.to(device)
        first = capture_layer_inputs(model, decoder_layers(model, arch), self.ids, device, len(ids))[0]
        self.kwargs = first.kwargs
        self.inputs = Boundaries()
        self.inputs.append(first.hidden)

    @property
    def layers(self) -> int:
        return len(decoder_layers(self.model, self.arch))

    def extend(self, i: int, layer: nn.Module, swap: Swap | None = None) -> None:
        """Append layer ``i``'s output (the layer on the device, ``swap``'s weights in it)."""
        assert len(self.inputs) == i + 1, "boundaries are built in layer order"
        with swapped(layer, f"{self.arch.layers}.{i}.", swap or {}):
            x = run_layer(layer, [LayerInput(self.inputs[i].to(self.device), self.kwargs)])[0].hidden
        self.inputs.append(x.cpu())

    def build(self, swap: "Swap | Callable[[int], Swap] | None" = None, start: int = 0,
              progress: bool = False) -> "Reference":
        """Boundaries from layer ``start`` on, with ``swap`` (or ``swap(i)`` for layer ``i``); those
        in front are kept."""
        self.inputs.truncate(start + 1)
        for i, layer in visit(self.model, self.arch, range(start, self.layers), self.device, keep=False,
                              progress=progress, desc="reference"):
            self.extend(i, layer, swap(i) if callable(swap) else swap)
        return self

    def nll(self, windows: int | None = None) -> float:
        """Mean NLL of the reference itself on its first ``windows`` windows."""
        n = windows or len(self.ids)
        with head_on(self.model, self.arch, self.device):
            return head_nll(self.model, self.arch, self.inputs[-1][:n].to(self.device), self.ids[:n]) / (
                n * (self.ids.shape[1] - 1))


def _first(v, n: int, total: int):
    """``v`` (a layer's keyword argument) for the first ``n`` of ``total`` windows."""
    if n == total:
        return v
    if isinstance(v, torch.Tensor):
        return v[:n] if v.dim() > 0 and v.shape[0] == total else v
    if isinstance(v, (tuple, list)):
        return type(v)(_first(x, n, total) for x in v)
    if isinstance(v, dict):
        return {k: _first(x, n, total) for k, x in v.items()}
    return v


@torch.no_grad()
def variant_nlls(ref: Reference, variants: "list[tuple[int, Swap | Callable[[int], Swap]]]", windows: int | None = None, group: int = 64,
                 progress: bool = False, desc: str = "variants", known: dict[int, float] | None = None,
                 on_batch: Callable[[dict[int, float]], None] | None = None,
                 score: "Callable[[torch.Tensor, int], float] | None" = None) -> list[float]:
    """Mean NLL of each variant ``(start, swap)`` on the reference's first ``windows`` windows: layers
    ``< start`` replayed from ``ref``, ``swap``'s weights in the layers from ``start`` on (``swap(i)``:
    a function giving layer ``i``'s, asked for when the layer runs, so a variant's weights are read
    from the cache one layer at a time). Variants
    with the same start run together, ``group`` at a time, over one visit of each later layer; with
    several processes each runs a share of every round of ``group`` per process, and all receive
    every result. ``known``: variants (by index) an earlier start measured, not run again;
    ``on_batch`` receives each round's results as they finish (each variant runs on its own: the
    values do not depend on the grouping). ``score(hidden, n)``: a variant's value from its last
    layer's output on the first ``n`` windows, in place of the mean NLL (with the head on the device)."""
    n = windows or len(ref.ids)
    ids = ref.ids[:n]
    count = n * (ids.shape[1] - 1)
    kwargs = {k: _first(v, n, len(ref.ids)) for k, v in ref.kwargs.items()}
    known = known or {}
    out = [known.get(v, 0.0) for v in range(len(variants))]
    start_of = [min(start, ref.layers) for start, _ in variants]
    pending = sorted((v for v in range(len(variants)) if v not in known), key=lambda v: start_of[v])
    bar = tqdm(total=len(variants), initial=len(variants) - len(pending), desc=desc, disable=not progress, unit="pass")
    step = group * dist.world()  # each round: a group's worth of variants per process
    for r in range(0, len(pending), step):
        batch = pending[r : r + step]
        mine = batch[dist.rank() :: dist.world()]
        results: dict[int, float] = {}
        for start in sorted({start_of[v] for v in mine}):  # those with the same start share the visit
            todo = [v for v in mine if start_of[v] == start]
            x = ref.inputs[start][:n]
            states = [x.to(ref.device) for _ in todo]
            for i, layer in visit(ref.model, ref.arch, range(start, ref.layers), ref.device, keep=False, progress=False):
                prefix = f"{ref.arch.layers}.{i}."
                for s, v in enumerate(todo):
                    sw = variants[v][1]
                    with swapped(layer, prefix, sw(i) if callable(sw) else sw):
                        states[s] = run_layer(layer, [LayerInput(states[s], kwargs)])[0].hidden
            with head_on(ref.model, ref.arch, ref.device):
                for s, v in enumerate(todo):
                    results[v] = (score(states[s], n) if score is not None
                                  else head_nll(ref.model, ref.arch, states[s], ids) / count)
        for part in dist.gather_all(results):
            results.update(part)
        for v, x in results.items():
            out[v] = x
        bar.update(len(batch))
        if on_batch is not None:
            on_batch(results)
    bar.close()
    return out
