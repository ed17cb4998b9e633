"""Several processes (``torchrun``): NCCL across GPUs, gloo across CPU processes.

Data-parallel calibration: each rank takes whole batches of the calibration windows (batch ``b``
goes to rank ``b mod world``, so every batch is the very batch one process would run), sums its
Hessians, and the sums are all-reduced. Each linear's output rows are spread over the ranks (GPTQ
and RTN solve every row on its own, given ``H``), and the parts are gathered on every rank. One process (no ``torchrun``) is the degenerate case: every
function here is then a no-op, so the library runs the same code either way.

``torchrun`` ends every rank when one fails, so a failure on one rank takes the others down with
its message instead of leaving them waiting in a collective.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as td

from .config import ConfigError


def world() -> int:
    return td.get_world_size() if td.is_available() and td.is_initialized() else 1


def rank() -> int:
    return td.get_rank() if td.is_available() and td.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Started by ``torchrun`` (or anything that sets its environment) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_name: str | None) -> str | None:
    """Join the process group ``torchrun`` set up; returns the device this rank computes on
    (``cuda:LOCAL_RANK`` on GPUs, else what was asked for)."""
    if not launched() or td.is_initialized():
        return device_name
    gpu = torch.cuda.is_available() and (device_name in (None, "auto") or str(device_name).startswith("cuda"))
    if gpu:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device_name = f"cuda:{local}"
    td.init_process_group("nccl" if gpu else "gloo", timeout=datetime.timedelta(hours=2))
    return device_name


def check_batches(windows: int, batch_size: int) -> None:
    """Refuse ``windows`` calibration windows in batches of ``batch_size`` that give some process no
    whole batch (a command that shards later calls this before its long work)."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be at least 1.")
    batches = -(-windows // batch_size)
    if batches < world():
        raise ConfigError(f"{windows} windows make {batches} batches of {batch_size}, fewer than the "
                          f"{world()} processes: pass more --nsamples or a smaller --batch-size.")


def shard_batches(windows: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
    """This rank's whole batches of ``windows`` (n, seq): batch ``b`` to rank ``b mod world``."""
    if windows is None or world() == 1:
        return windows
    check_batches(windows.shape[0], batch_size)
    return torch.cat(list(windows.split(batch_size))[rank():: world()])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, in place."""
    if world() > 1:
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def gather_all(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (pass tensors on the CPU)."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    td.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def main_first():
    """The first process runs the block before the others do (it downloads or converts a model
    once; the others then read its cache)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def barrier() -> None:
    if world() > 1:
        td.barrier()


def finish() -> None:
    """Leave the process group together: no rank tears its connections down while another still
    works (CI once saw a gloo rank abort at exit when it finished first)."""
    if td.is_available() and td.is_initialized():
        td.barrier()
        td.destroy_process_group()
