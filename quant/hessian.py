"""The layer-wise proxy Hessian ``H = 2 X Xᵀ / n`` of a linear layer's inputs (GPTQ, eq. 1-2),
kept as a sum plus a row count so batches can arrive one at a time. Each batch's ``XᵀX`` is an fp32
product; the sum is kept in fp64, so it does not depend (to fp32 precision) on the order batches
arrive in, or on how they are split over processes, whose sums are all-reduced (:mod:`quant.dist`)."""
from __future__ import annotations

import torch


class CalibrationError(ValueError):
    """Calibration activations are unusable (NaN/Inf); the message names the module."""


def accumulate_hessian(H_sum: torch.Tensor | None, x: torch.Tensor, name: str = "module") -> tuple[torch.Tensor, int]:
    """Add ``x`` (..., in) to the running sum ``Σ x xᵀ`` (in, in); returns (sum, rows added)."""
    x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)  # (rows, in)
    if not torch.isfinite(x).all():
        raise CalibrationError(
            f"NaN or Inf in the calibration activations entering {name}: the model overflows on this input "
            "(try --dtype float32 or bfloat16 instead of float16) or its weights are already broken."
        )
    if H_sum is None:
        H_sum = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    H_sum.add_(x.T @ x)  # (in, in): the fp32 product added in fp64, without an fp64 copy of it
    return H_sum, x.shape[0]


class HessianAccumulator:
    """Collects ``H`` for one module from forward-hook inputs."""

    def __init__(self, name: str):
        self.name, self.sum, self.count = name, None, 0
        self._H: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        self.sum, rows = accumulate_hessian(self.sum, x, self.name)
        self.count += rows

    def hessian(self) -> torch.Tensor:
        """``H`` (in, in) in fp32 over every process's inputs; the sum is consumed (scaled in place)."""
        if self._H is None:
            from . import dist

            if self.sum is None:  # every process gets whole batches, so none sees no rows
                raise CalibrationError(f"{self.name} received no calibration inputs: is it used in the forward pass?")
            # on the sum's device: NCCL reduces GPU tensors only
            count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device)
            count = float(dist.all_reduce_sum(count)[0])
            self._H = dist.all_reduce_sum(self.sum).mul_(2.0 / count).to(torch.float32)
            self.sum = None
        return self._H
