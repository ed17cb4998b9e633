"""Triton kernels against the PyTorch reference. Without a GPU they run in Triton's interpreter
(``TRITON_INTERPRET=1``, set in conftest.py); on a GPU the same tests run natively."""
import pytest
import torch

from quant.config import ModuleSpec
from quant.gptq import gptq_quantize
from quant.qlinear import KERNELS, QuantLinear, dequantize_packed, select_kernel
from quant.quantizer import rtn_quantize

triton = pytest.importorskip("triton")
from quant.kernels import triton_qmm  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean().clamp_min(1e-30))).item()


def make_layer(bits, K, N, act_order, seed=0, group_size=32):
    torch.manual_seed(seed)
    w = torch.randn(N, K)
    spec = ModuleSpec(bits, group_size, False)
    if act_order:
        x = torch.randn(256, K) * torch.linspace(0.1, 3, K)
        qw = gptq_quantize(w, 2 * x.T @ x / 256, spec, act_order=True)
    else:
        qw = rtn_quantize(w, spec)
    return QuantLinear.from_quantized(qw, torch.randn(N) * 0.1, dtype=torch.float32).to(DEVICE)


def reference(layer, x):
    w = dequantize_packed(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, torch.float32)
    return torch.nn.functional.linear(x.float(), w, layer.bias.float())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("batch", [1, 3, 16, 33])
@pytest.mark.parametrize("K,N,act_order,group_size", [(96, 160, False, 32), (352, 96, True, 32), (320, 96, False, 64)])
def test_kernel_matches_reference_fp32(bits, batch, K, N, act_order, group_size):
    """Group 32 and act-order dequantize row by row (``g_idx``); group 64 tiles lie inside one group,
    where scale and zero are applied after the sum."""
    layer = make_layer(bits, K, N, act_order, group_size=group_size)
    x = torch.randn(batch, K, device=DEVICE)
    out, ref = triton_qmm.qmatmul(x, layer), reference(layer, x)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert sqnr_db(ref, out) > 60


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,batch", [(4, 1), (3, 16), (2, 5)])
def test_kernel_half_precision_activations(dtype, bits, batch):
    layer = make_layer(bits, 128, 96, act_order=bits == 3, group_size=32 if bits == 3 else 128)
    x = torch.randn(2, batch, 128, device=DEVICE).to(dtype)  # 3-D input: (..., in)
    out = triton_qmm.qmatmul(x, layer)
    ref = reference(layer, x.float())
    assert out.dtype == dtype and out.shape == (2, batch, 96)
    assert sqnr_db(ref, out.float()) > (35 if dtype == torch.float16 else 28)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_large_batches_dequantize_then_matmul(bits, act_order, monkeypatch):
    """From ``DEQUANT_MIN_ROWS`` rows the weight is dequantized by a Triton kernel and multiplied by
    cuBLAS; the dequantized weight must equal the reference's exactly."""
    layer = make_layer(bits, 352 if act_order else 320, 96, act_order, group_size=32 if act_order else 64)
    assert torch.equal(triton_qmm.dequantize_t(layer, torch.float32), layer.dequantize(torch.float32).T)
    monkeypatch.setattr(triton_qmm, "DEQUANT_MIN_ROWS", 4)
    x = torch.randn(5, layer.in_features, device=DEVICE)
    assert torch.allclose(triton_qmm.qmatmul(x, layer), reference(layer, x), rtol=1e-4, atol=1e-4)


def test_tiles_stay_powers_of_two_for_any_group_size():
    """Triton tiles must be powers of two: a group of 96 must not shrink a K tile to 96."""
    for gs in (0, 32, 64, 96, 128, 192, 256, 320):
        for default in (64, 128):
            bk, one_group = triton_qmm._k_tile(default, gs)
            assert bk & (bk - 1) == 0 and bk <= default
    assert triton_qmm._k_tile(128, 64) == (64, True) and triton_qmm._k_tile(128, 256) == (128, True)  # inside one group
    assert triton_qmm._k_tile(128, 96) == (128, False) and triton_qmm._k_tile(64, 32) == (64, False)  # rows gather g_idx


def test_three_bit_runtime_layout_holds_the_same_codes():
    layer = make_layer(3, 96, 64, act_order=False)
    rt = triton_qmm.runtime_layout(layer)
    codes = layer.unpack().intweight.to(torch.int64).T  # (in, out)
    lo = ((rt["qw"].unsqueeze(1).to(torch.int64) >> (2 * torch.arange(16, device=DEVICE)).view(1, -1, 1)) & 3).reshape(96, 64)
    hi = ((rt["qhi"].unsqueeze(1).to(torch.int64) >> torch.arange(32, device=DEVICE).view(1, -1, 1)) & 1).reshape(96, 64)
    assert torch.equal(lo | (hi << 2), codes.to(DEVICE))


def test_dispatch(monkeypatch):
    monkeypatch.delenv("HMQ_KERNEL", raising=False)
    assert select_kernel(torch.device("cpu")) == "torch"
    if torch.cuda.is_available():
        assert select_kernel(torch.device("cuda")) == "triton"
    monkeypatch.setenv("HMQ_KERNEL", "torch")
    assert select_kernel(torch.device("cuda")) == "torch"
    monkeypatch.setenv("HMQ_KERNEL", "nope")
    with pytest.raises(ValueError, match="HMQ_KERNEL='nope'"):
        select_kernel(torch.device("cpu"))
    assert "triton" in KERNELS


def test_quantized_model_through_triton_matches_torch_path(monkeypatch, tmp_path):
    from quant.arch import get_arch
    from quant.config import QuantConfig
    from quant.export import save_quantized
    from quant.loading import load_quantized
    from quant.pipeline import quantize_model

    from .conftest import build_tiny, windows

    model = build_tiny("llama")
    cfg = QuantConfig(bits=3, group_size=32, overrides={r"mlp\.down_proj": {"bits": 4}})
    quantize_model(model, get_arch("llama"), windows(4, 32), cfg, torch.device("cpu"), progress=False)
    path = save_quantized(model, None, tmp_path / "q", cfg, save_dtype=torch.float32)
    x = windows(1, 16, seed=9).to(DEVICE)
    monkeypatch.setenv("HMQ_KERNEL", "torch")
    ref = load_quantized(path, device=DEVICE)(x).logits
    monkeypatch.setenv("HMQ_KERNEL", "triton")
    out = load_quantized(path, device=DEVICE)(x).logits
    assert torch.allclose(out, ref, rtol=1e-3, atol=1e-3)
