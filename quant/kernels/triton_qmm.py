"""Triton matmul of activations with GPTQ-packed 2/3/4/8-bit weights: ``y = x @ dequant(W)ᵀ``.

Two kernels share one dequantization routine:

* **GEMV / skinny GEMM** (batch ≤ 8): each program owns ``BLOCK_N`` output columns and a slice of
  K (split-K); partial sums are added into an fp32 output with atomics. Products are reduced with
  ``tl.sum``, which wastes nothing at batch 1 where ``tl.dot``'s 16-row minimum would.
* **GEMM** (batch > 8): tiles of ``BLOCK_M × BLOCK_N``; each K step dequantizes a
  ``BLOCK_K × BLOCK_N`` weight tile into the activation dtype and feeds ``tl.dot``.

Dequantization: codes are unpacked with a shift and a mask from words holding whole codes; the
group of each K row comes from ``g_idx`` (so act-order checkpoints work) and its scale and zero
are loaded once per (row, column) tile. 3-bit words straddle code boundaries, so at load time a
3-bit weight is repacked into a *runtime layout* of two planes that hold whole codes — the low 2
bits (16 codes per word) and the high bit (32 per word); the on-disk layout stays GPTQ's.
Zeros are unpacked once to int32 (``groups × N``, small). Accumulation is fp32 throughout.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..packing import pack_rows, unpack_rows
from ..qlinear import QuantLinear, contiguous_group_size, register_kernel

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dequant_tile(qw_ptr, qhi_ptr, scales_ptr, zeros_ptr, gidx_ptr, k0, offs_k, offs_n, N, K,
                  LO_BITS: tl.constexpr, HAS_HI: tl.constexpr, GS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weight tile (BLOCK_K, BLOCK_N) in fp32 from the runtime layout.

    ``GS`` > 0 means groups are runs of ``GS`` rows (no act-order); when a K tile fits in one group,
    its scales and zeros are one row loaded once. Otherwise each row's group comes from ``g_idx``.
    """
    PER: tl.constexpr = 32 // LO_BITS
    mk = offs_k < K
    mask = mk[:, None] & (offs_n < N)[None, :]
    words = tl.load(qw_ptr + (offs_k // PER)[:, None] * N + offs_n[None, :], mask=mask, other=0)
    codes = (words >> ((offs_k % PER) * LO_BITS)[:, None]) & ((1 << LO_BITS) - 1)
    if HAS_HI:
        hi = tl.load(qhi_ptr + (offs_k // 32)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        codes = codes | (((hi >> (offs_k % 32)[:, None]) & 1) << LO_BITS)
    if GS > 0 and GS % BLOCK_K == 0:
        g0 = k0 // GS
        mn = offs_n < N
        scale = tl.load(scales_ptr + g0 * N + offs_n, mask=mn, other=0.0).to(tl.float32)  # (BN,)
        zero = tl.load(zeros_ptr + g0 * N + offs_n, mask=mn, other=0)
        return (codes - zero[None, :]).to(tl.float32) * scale[None, :]
    else:
        g = tl.load(gidx_ptr + offs_k, mask=mk, other=0)
        scale = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0)
        return (codes - zero).to(tl.float32) * scale


def _configs(gemm: bool):
    if INTERPRET:  # the interpreter runs every config it is given: keep one
        return [triton.Config({"BLOCK_M": 16 if gemm else 1, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2})]
    out = []
    for bn in (64, 128, 256):
        for bk in (32, 64, 128):
            for sk in ((1, 2, 4) if gemm else (1, 2, 4, 8, 16)):
                for bm in ((16, 32, 64) if gemm else (1,)):
                    for warps in (4, 8):
                        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk},
                                                 num_warps=warps, num_stages=3))
    return out


@triton.autotune(configs=_configs(False), key=["M_BUCKET", "N", "K", "LO_BITS", "HAS_HI", "GS"], reset_to_zero=["out_ptr"])
@triton.jit
def _qgemv_kernel(x_ptr, qw_ptr, qhi_ptr, scales_ptr, zeros_ptr, gidx_ptr, out_ptr, M, N, K, M_BUCKET,
                  stride_xm, stride_xk, LO_BITS: tl.constexpr, HAS_HI: tl.constexpr, GS: tl.constexpr,
                  ROWS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, ROWS)  # all batch rows (≤ 8) in one program: the weight tile is read once
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)  # (ROWS, BK)
        w = _dequant_tile(qw_ptr, qhi_ptr, scales_ptr, zeros_ptr, gidx_ptr, k0, offs_k, offs_n, N, K, LO_BITS, HAS_HI,
                          GS, BLOCK_K)
        acc += tl.sum(a[:, :, None] * w[None, :, :], axis=1)  # (ROWS, BN)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.atomic_add(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)


@triton.autotune(configs=_configs(True), key=["M_BUCKET", "N", "K", "LO_BITS", "HAS_HI", "GS"], reset_to_zero=["out_ptr"])
@triton.jit
def _qgemm_kernel(x_ptr, qw_ptr, qhi_ptr, scales_ptr, zeros_ptr, gidx_ptr, out_ptr, M, N, K, M_BUCKET,
                  stride_xm, stride_xk, LO_BITS: tl.constexpr, HAS_HI: tl.constexpr, GS: tl.constexpr,
                  ROWS: tl.constexpr,
                  UPCAST: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0)  # (BM, BK)
        w = _dequant_tile(qw_ptr, qhi_ptr, scales_ptr, zeros_ptr, gidx_ptr, k0, offs_k, offs_n, N, K, LO_BITS, HAS_HI,
                          GS, BLOCK_K)
        if UPCAST:  # fp32 inputs, or bf16 under the interpreter (its bf16 tl.dot is wrong)
            acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(a, w.to(a.dtype))
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.atomic_add(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)


GEMV_MAX_ROWS = 8


def runtime_layout(layer: QuantLinear) -> dict:
    """The tensors the kernels read, built once per layer and device from the packed buffers."""
    rt = getattr(layer, "_triton_rt", None)
    if rt is not None and rt["device"] == layer.qweight.device:
        return rt
    bits, n = layer.bits, layer.out_features
    if bits == 3:
        codes = unpack_rows(layer.qweight.T.contiguous(), 3, layer.in_features).to(torch.int64)  # (out, in)
        lo = pack_rows(codes & 3, 2).T.contiguous()  # (in/16, out)
        hi = _pack_bits(codes >> 2)  # (in/32, out)
        qw, qhi, lo_bits = lo, hi, 2
    else:
        qw, qhi, lo_bits = layer.qweight.contiguous(), layer.qweight, bits  # qhi unused (HAS_HI False)
    rt = {
        "device": layer.qweight.device,
        "qw": qw,
        "qhi": qhi,
        "lo_bits": lo_bits,
        "has_hi": bits == 3,
        "zeros": (unpack_rows(layer.qzeros, bits, n).to(torch.int32) + 1).contiguous(),  # (groups, out)
        "scales": layer.scales.contiguous(),
        "g_idx": layer.g_idx.to(torch.int32).contiguous(),
        "gs": contiguous_group_size(layer.g_idx, layer.scales.shape[0]),
    }
    layer._triton_rt = rt
    return rt


def _pack_bits(bits01: torch.Tensor) -> torch.Tensor:
    """(out, in) tensor of 0/1 -> int32 (in/32, out), bit j of word r = value at k = 32r + j."""
    out_f, in_f = bits01.shape
    b = bits01.reshape(out_f, in_f // 32, 32).to(torch.int64)
    words = (b << torch.arange(32, device=b.device)).sum(-1)  # (out, in/32), values < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).T.contiguous()


def _bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())  # autotune per power-of-two batch size


def qmatmul(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """``x`` (..., in) -> (..., out) in ``x``'s dtype."""
    rt = runtime_layout(layer)
    x2 = x.reshape(-1, layer.in_features)  # (M, K)
    M, K, N = x2.shape[0], layer.in_features, layer.out_features
    out = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    args = (x2, rt["qw"], rt["qhi"], rt["scales"], rt["zeros"], rt["g_idx"], out, M, N, K, _bucket(M),
            x2.stride(0), x2.stride(1))
    if M <= GEMV_MAX_ROWS:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])
        _qgemv_kernel[grid](*args, LO_BITS=rt["lo_bits"], HAS_HI=rt["has_hi"], GS=rt["gs"],
                             ROWS=_bucket(M))
    else:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"], triton.cdiv(M, meta["BLOCK_M"]))
        upcast = x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16)
        _qgemm_kernel[grid](*args, LO_BITS=rt["lo_bits"], HAS_HI=rt["has_hi"], GS=rt["gs"],
                            ROWS=1, UPCAST=upcast)
    if layer.bias is not None:
        out += layer.bias.to(torch.float32)
    return out.to(x.dtype).reshape(*x.shape[:-1], N)


@register_kernel("triton")
def triton_kernel(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return qmatmul(x, layer)
