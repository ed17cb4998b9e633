"""Bit packing of integer codes into int32 words, in the GPTQ checkpoint layout.

Codes are laid out as one little-endian bit stream per row of the packing axis: code ``j`` of a
run occupies bits ``[j*bits, (j+1)*bits)`` of the stream, and the stream is cut into 32-bit words.
For 2, 4 and 8 bits every word holds ``32 // bits`` whole codes; for 3 bits a period of 32 codes
fills 3 words and codes 10 and 21 straddle a word boundary — exactly what GPTQ's reference
``pack`` writes, so checkpoints interoperate. The arithmetic is done in int64 and wrapped to
int32 at the end (torch has no uint32 shifts on every device).
"""
from __future__ import annotations

import enum
import math

import torch

from .quantizer import QuantizedWeight

PACK_BITS = (2, 3, 4, 8)


class PackLayout(enum.Enum):
    """Where the packed tensors put their codes (the on-disk contract of a checkpoint)."""

    GPTQ = "gptq"
    """``qweight`` (in*bits/32, out): codes of one output column packed along ``in``;
    ``qzeros`` (n_groups, out*bits/32): ``zero - 1`` packed along ``out`` (the v1 convention that
    every GPTQ loader understands); ``scales`` (n_groups, out) fp16; ``g_idx`` (in,) int32."""


def codes_per_period(bits: int) -> tuple[int, int]:
    """(codes, words) of the smallest run that fills whole int32 words: (16,1) (32,3) (8,1) (4,1)."""
    words = bits // math.gcd(32, bits)
    return words * 32 // bits, words


def check_packable(length: int, bits: int, what: str = "dimension") -> None:
    if bits not in PACK_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes: packing supports {PACK_BITS} bits.")
    period, _ = codes_per_period(bits)
    if length % period != 0:
        raise ValueError(
            f"{what} of length {length} cannot be packed at {bits} bits: it must be a multiple of {period} "
            f"(32 codes fill 3 words at 3 bits); keep this module at 16 bits or pick another width."
        )


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` (..., n) with values in [0, 2**bits) along the last axis into int32 (..., n*bits/32)."""
    n = codes.shape[-1]
    check_packable(n, bits, "packing axis")
    period, words = codes_per_period(bits)
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], n // period, period)  # (..., runs, period)
    out = torch.zeros(*c.shape[:-1], words, dtype=torch.int64, device=codes.device)  # (..., runs, words)
    for j in range(period):
        offset = j * bits
        w, s = divmod(offset, 32)
        out[..., w] |= (c[..., j] << s) & 0xFFFFFFFF
        if s + bits > 32:  # straddles into the next word (3-bit codes 10 and 21 of each run)
            out[..., w + 1] |= c[..., j] >> (32 - s)
    out = out.reshape(*codes.shape[:-1], n * bits // 32)
    out = torch.where(out >= 2**31, out - 2**32, out)  # reinterpret uint32 as int32
    return out.to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 (..., m) -> codes (..., m*32/bits) as uint8."""
    m = packed.shape[-1]
    period, words = codes_per_period(bits)
    if words == 1:  # 2/4/8 bits: whole codes per word; int32 shifts (sign bits are masked off)
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)  # (period,)
        out = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (..., m, period)
        out = out.reshape(*packed.shape[:-1], m * period)
        if n is not None and out.shape[-1] != n:
            raise ValueError(f"unpacked length {out.shape[-1]} does not match the expected {n}.")
        return out.to(torch.uint8)
    if m % words != 0:
        raise ValueError(f"packed axis of length {m} is not a whole number of {bits}-bit runs ({words} words each).")
    p = packed.to(torch.int64) & 0xFFFFFFFF
    p = p.reshape(*packed.shape[:-1], m // words, words)  # (..., runs, words)
    mask = (1 << bits) - 1
    cols = []
    for j in range(period):
        offset = j * bits
        w, s = divmod(offset, 32)
        v = p[..., w] >> s
        if s + bits > 32:
            v = v | (p[..., w + 1] << (32 - s))
        cols.append(v & mask)
    out = torch.stack(cols, dim=-1).reshape(*packed.shape[:-1], m // words * period)
    if n is not None and out.shape[-1] != n:
        raise ValueError(f"unpacked length {out.shape[-1]} does not match the expected {n}.")
    return out.to(torch.uint8)


def pack_gptq(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The GPTQ checkpoint tensors of one quantized linear (see :attr:`PackLayout.GPTQ`)."""
    out_f, in_f = qw.shape
    check_packable(in_f, qw.bits, "in_features")
    check_packable(out_f, qw.bits, "out_features")
    return {
        "qweight": pack_rows(qw.intweight, qw.bits).T.contiguous(),  # (in*bits/32, out)
        "qzeros": pack_rows((qw.zeros - 1).clamp_min(0), qw.bits),  # (n_groups, out*bits/32)
        "scales": qw.scales.to(torch.float16),  # (n_groups, out)
        "g_idx": qw.g_idx.to(torch.int32),  # (in,)
    }


def unpack_gptq(tensors: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool) -> QuantizedWeight:
    """Inverse of :func:`pack_gptq`; bit-exact."""
    qweight, qzeros = tensors["qweight"], tensors["qzeros"]
    in_f = qweight.shape[0] * 32 // bits
    out_f = qweight.shape[1]
    return QuantizedWeight(
        intweight=unpack_rows(qweight.T.contiguous(), bits, in_f),  # (out, in)
        scales=tensors["scales"].to(torch.float32),
        zeros=unpack_rows(qzeros, bits, out_f).to(torch.int32) + 1,
        g_idx=tensors["g_idx"].to(torch.int32),
        bits=bits,
        group_size=group_size,
        sym=sym,
    )
