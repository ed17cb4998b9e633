"""Fast kernels for :class:`quant.qlinear.QuantLinear`; each registers itself in ``KERNELS`` when it
can run here. The PyTorch path in ``quant/qlinear.py`` is the reference every kernel is tested against."""
from __future__ import annotations


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def load() -> None:
    """Import the kernels that this machine can run, registering them."""
    if triton_available():
        from . import triton_qmm  # noqa: F401
