"""Resume after a kill: a sweep's finished layers, saved one at a time in a folder beside the output.

After each decoder layer the stage saves that layer's whole state (its quantized modules, and the
fp tensors it changed or kept) and the activations the next layer needs, each file written to a
temporary name and then renamed, and only then records the layer as done in ``state.json``. A
kill at any point leaves a folder from which the same command goes on with the first layer not
recorded, and ends with the same tensors as a run that was never stopped: the next layer's inputs
and the random-number state are restored exactly.

The folder belongs to one set of settings. A rerun with other settings is refused, naming what
differs and how to discard the folder, so a stale state never leaks into a new run.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import dist
from .arch import set_submodule
from .capture import LayerInput
from .config import ConfigError
from .qlinear import QuantLinear

STATE = "state.json"
VERSION = 1



def layer_key(i: int) -> str:
    """The file name (without suffix) that holds decoder layer ``i``'s saved work in a state or cache folder."""
    return f"layer-{i:05d}"

def placed(hidden: list[torch.Tensor], inputs: list[LayerInput]) -> list[LayerInput]:
    """Saved per-batch activations as layer inputs, with the per-batch arguments (masks, positions)
    the sweep made again for ``inputs``, on their device."""
    return [LayerInput(h.to(x.hidden.device), x.kwargs) for h, x in zip(hidden, inputs)]


def discard(folder: Path) -> None:
    """Remove ``folder`` if it is a resume state (it holds a state.json), by the first process."""
    if dist.is_main() and (folder / STATE).is_file():
        shutil.rmtree(folder, ignore_errors=True)


class StaleState(ConfigError):
    """The saved state was written by a run with other settings."""


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, meta: dict | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"hmq": json.dumps(meta)} if meta is not None else None)
    os.replace(tmp, path)


def _atomic_json(payload: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


class LayerState:
    """Saved layers of one run in ``folder``; ``done``: how many layers, from the first, are saved.

    ``settings`` (plain JSON data) identify the run: a folder written with other settings raises
    :class:`StaleState` unless ``restart``, which discards it."""

    def __init__(self, folder: str | Path, settings: dict, restart: bool = False, what: str = "run"):
        self.folder = Path(folder).expanduser()
        # as it reads back from JSON; each process saves its own activations, so their number counts too
        self.settings = json.loads(json.dumps({**settings, "processes": dist.world()}))
        self.done = 0
        self.extra: dict = {}  # what the run decided before its first layer (a mixed run's allocation)
        state = self.folder / STATE
        if restart and self.folder.exists() and dist.is_main():
            shutil.rmtree(self.folder)
        dist.barrier()
        saved = json.loads(state.read_text()) if state.is_file() else None
        foreign = saved is None and self.folder.exists() and any(self.folder.iterdir())
        dist.barrier()  # every process has looked at the folder before the first one writes to it
        if saved is not None and saved.get("done") == 0 and saved.get("settings") != self.settings:
            saved = None  # nothing was saved under those settings: nothing to lose
            if dist.is_main():
                shutil.rmtree(self.folder)
        if saved is not None:
            if saved.get("version") != VERSION or saved.get("settings") != self.settings:
                old = saved.get("settings") or {}
                keys = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
                raise StaleState(
                    f"{self.folder} holds the saved layers of an unfinished {what} with other settings (differs in: "
                    f"{', '.join(keys) or 'the state version'}). Rerun with the same settings to resume it, or "
                    f"discard it: pass --restart, or delete the folder (rm -r {self.folder}).")
            self.done = int(saved["done"])
            self.extra = saved.get("extra") or {}
        elif foreign:
            raise StaleState(f"{self.folder} exists but holds no {STATE}: it is not an hmq resume folder. Move or "
                             "delete it, or choose another --out.")
        else:  # recorded before any layer, so a kill while layer 0 is saved leaves a folder a rerun reads
            if dist.is_main():
                self.folder.mkdir(parents=True, exist_ok=True)
                self._write_state()
        dist.barrier()

    def _write_state(self) -> None:
        _atomic_json({"version": VERSION, "settings": self.settings, "done": self.done, "extra": self.extra},
                     self.folder / STATE)

    def _layer_file(self, i: int) -> Path:
        return self.folder / f"{layer_key(i)}.safetensors"

    def _stream_file(self, i: int) -> Path:
        part = f"-rank{dist.rank()}" if dist.world() > 1 else ""  # every process has its own batches
        return self.folder / f"inputs-{i:05d}{part}.safetensors"

    def save(self, i: int, layer: nn.Module | dict[str, torch.Tensor], meta: dict,
             streams: dict[str, list[torch.Tensor]]) -> None:
        """Layer ``i`` is finished: its state (the layer, or the tensors a stage keeps of it), ``meta``
        (plain data), and ``streams`` (named lists of per-batch activations entering layer ``i + 1``),
        then ``done = i + 1``."""
        if i != self.done:
            raise RuntimeError(f"layer {i} saved after {self.done} layers: layers are saved in order")
        if isinstance(layer, nn.Module):
            quantized = {n: [m.in_features, m.out_features, m.bits, m.group_size, m.sym, m.bias is not None,
                             str(m.bias.dtype if m.bias is not None else torch.float16).removeprefix("torch.")]
                         for n, m in layer.named_modules() if isinstance(m, QuantLinear)}
            tensors = layer.state_dict()
        else:
            quantized, tensors = {}, layer
        if dist.is_main():  # every process holds the same layer
            _atomic_save(tensors, self._layer_file(i), {"meta": meta, "quantized": quantized})
        tensors = {f"{name}.{b}": t for name, batches in streams.items() for b, t in enumerate(batches)}
        tensors["rng"] = torch.get_rng_state()
        _atomic_save(tensors, self._stream_file(i + 1), {"streams": {k: len(v) for k, v in streams.items()}})
        dist.barrier()  # every process's files are in place before the layer counts as done
        self.done = i + 1
        if dist.is_main():
            self._write_state()
        dist.barrier()
        old = self._stream_file(i)
        if old.exists():
            old.unlink()

    def saved(self, i: int) -> tuple[dict[str, torch.Tensor], dict]:
        """What :meth:`save` kept of layer ``i`` (< ``done``): its tensors and its meta."""
        tensors, info = self._read(i)
        return tensors, info["meta"]

    def _read(self, i: int) -> tuple[dict[str, torch.Tensor], dict]:
        with safe_open(str(self._layer_file(i)), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["hmq"])

    def record(self, key: str, value) -> None:
        """Keep ``value`` (plain data: what a stage after the layers has finished) under ``key``."""
        self.extra[key] = json.loads(json.dumps(value))  # as a rerun reads it back
        if dist.is_main():
            self._write_state()

    def restore(self, i: int, layer: nn.Module) -> dict:
        """Put saved layer ``i`` (< ``done``) into ``layer`` (its fp skeleton, materialized); returns its meta."""
        state, info = self._read(i)
        for name, (in_f, out_f, bits, gs, sym, bias, dtype) in info["quantized"].items():
            set_submodule(layer, name, QuantLinear(in_f, out_f, bits, gs, sym, bias, getattr(torch, dtype)))
        layer.load_state_dict(state, strict=True)
        return info["meta"]

    def streams(self) -> dict[str, list[torch.Tensor]]:
        """The activations entering layer ``done``, and the random-number state restored as it was."""
        with safe_open(str(self._stream_file(self.done)), "pt") as f:
            counts = json.loads(f.metadata()["hmq"])["streams"]
            torch.set_rng_state(f.get_tensor("rng"))
            return {name: [f.get_tensor(f"{name}.{b}") for b in range(n)] for name, n in counts.items()}

    def finish(self) -> None:
        """The run's output is written: the saved layers are not needed any more."""
        dist.barrier()
        if dist.is_main():
            shutil.rmtree(self.folder, ignore_errors=True)
