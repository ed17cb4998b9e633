import pytest
import torch

from quant.config import ModuleSpec
from quant.packing import check_packable, pack_gptq, pack_rows, unpack_gptq, unpack_rows
from quant.qlinear import QuantLinear, dequantize_packed
from quant.quantizer import rtn_quantize


def reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-by-bit packing written independently: code j of a row sets bits j*bits.. of the row's stream."""
    rows, n = codes.shape
    words = torch.zeros(rows, n * bits // 32, dtype=torch.int64)
    for r in range(rows):
        for j in range(n):
            for b in range(bits):
                if (int(codes[r, j]) >> b) & 1:
                    pos = j * bits + b
                    words[r, pos // 32] |= 1 << (pos % 32)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_bitwise_reference(bits):
    torch.manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 64))
    assert torch.equal(pack_rows(codes, bits), reference_pack(codes, bits))


def test_three_bit_codes_straddle_words():
    codes = torch.zeros(1, 32, dtype=torch.int64)
    codes[0, 10] = 0b111  # bits 30..32: two bits in word 0, one in word 1
    packed = pack_rows(codes, 3).to(torch.int64) & 0xFFFFFFFF
    assert packed[0, 0].item() == 0b11 << 30 and packed[0, 1].item() == 1 and packed[0, 2].item() == 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(1, 32), (5, 96), (4, 3, 64), (2, 384)])
def test_round_trip_bit_exact(bits, shape):
    torch.manual_seed(0)
    codes = torch.randint(0, 2**bits, shape)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape[-1] == shape[-1] * bits // 32
    assert torch.equal(unpack_rows(packed, bits).long(), codes)


def test_extremes_round_trip():
    for bits in (2, 3, 4, 8):
        for value in (0, 2**bits - 1):
            codes = torch.full((2, 32), value)
            assert torch.equal(unpack_rows(pack_rows(codes, bits), bits).long(), codes)


def test_unpackable_length_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of 32"):
        check_packable(48, 3)
    with pytest.raises(ValueError, match="cannot pack 5-bit"):
        check_packable(64, 5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_gptq_tensors_round_trip_and_v1_zeros(bits, sym):
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    w[:, :32] = w[:, :32].abs()  # a group with minimum 0: zero point would be 0 without the v1 clamp
    qw = rtn_quantize(w, ModuleSpec(bits, 32, sym))
    assert int(qw.zeros.min()) >= 1 and int(qw.zeros.max()) <= 2**bits - 1
    t = pack_gptq(qw)
    assert t["qweight"].shape == (128 * bits // 32, 64) and t["qzeros"].shape == (4, 64 * bits // 32)
    assert torch.equal(unpack_rows(t["qzeros"], bits).long() + 1, qw.zeros.long())  # v1: zero - 1 stored
    back = unpack_gptq(t, bits, 32, sym)
    assert torch.equal(back.intweight, qw.intweight) and torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.scales, qw.scales)
    assert torch.equal(dequantize_packed(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, torch.float32),
                       qw.dequantize())


def test_quantlinear_matches_dequantized_linear():
    torch.manual_seed(2)
    w, bias, x = torch.randn(96, 64), torch.randn(96), torch.randn(3, 5, 64)
    qw = rtn_quantize(w, ModuleSpec(3, 32))
    layer = QuantLinear.from_quantized(qw, bias, dtype=torch.float32)
    ref = torch.nn.functional.linear(x, qw.dequantize(), bias)
    assert torch.allclose(layer(x), ref, atol=1e-5)
    assert layer.storage_bytes == 64 * 96 * 3 // 8 + 2 * 96 * 2 + 2 * 96 * 3 // 8
