"""The layer-wise proxy Hessian ``H = 2 X Xᵀ / n`` of a linear layer's inputs (GPTQ, eq. 1-2),
kept as an fp32 sum plus a row count so batches can arrive one at a time."""
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
        H_sum = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    H_sum.addmm_(x.T, x)  # (in, in)
    return H_sum, x.shape[0]


class HessianAccumulator:
    """Collects ``H`` for one module from forward-hook inputs."""

    def __init__(self, name: str):
        self.name, self.sum, self.count = name, None, 0

    def add(self, x: torch.Tensor) -> None:
        self.sum, rows = accumulate_hessian(self.sum, x, self.name)
        self.count += rows

    def hessian(self) -> torch.Tensor:
        if self.count == 0:
            raise CalibrationError(f"{self.name} received no calibration inputs: is it used in the forward pass?")
        return self.sum * (2.0 / self.count)  # (in, in)
