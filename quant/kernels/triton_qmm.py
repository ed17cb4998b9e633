"""Triton matmul of activations with GPTQ-packed 2/3/4/8-bit weights: ``y = x @ dequant(W)ᵀ``.

Three paths, by batch (rows of ``x``), sharing one unpacking routine:

* **GEMV / skinny GEMM** (batch ≤ 8): each program owns ``BLOCK_N`` output columns and a slice of
  K (split-K); partial sums are added into an fp32 output with atomics. Products are reduced with
  ``tl.sum``, which wastes nothing at batch 1 where ``tl.dot``'s 16-row minimum would.
* **GEMM** (batch 9 … ``DEQUANT_MIN_ROWS`` − 1): tiles of ``BLOCK_M × BLOCK_N`` through ``tl.dot``.
* **Dequantize + cuBLAS** (larger batches, e.g. prefill): one kernel writes the weight in the
  activation dtype, then ``torch.matmul``; on an H100 this beat the tiled kernel 2–4× from batch 128.

Unpacking: each packed word is loaded once and split into its codes by shifts. Where a K tile lies
inside one quantization group, scale and zero are applied once per tile after the sum
(``Σ a·(q − z)·s = s·(Σ a·q − z·Σ a)``); otherwise (act-order ``g_idx``, small groups) each row's
scale and zero are gathered. 3-bit words straddle code boundaries, so at load time a 3-bit weight is
repacked into a *runtime layout* of two planes that hold whole codes — the low 2 bits (16 codes per
word) and the high bit (32 per word); the on-disk layout stays GPTQ's. Accumulation is fp32.
Tile sizes follow fixed rules of the shape (see :func:`qmatmul`); numbers: ``bench/kernel_speed.py``.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..packing import pack_rows, unpack_rows
from ..qlinear import QuantLinear, contiguous_group_size, register_kernel

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _codes(qw_ptr, qhi_ptr, k0, offs_n, N, K, LO_BITS: tl.constexpr, HAS_HI: tl.constexpr, BLOCK_K: tl.constexpr,
           BLOCK_N: tl.constexpr):
    """Integer codes (BLOCK_K, BLOCK_N) of rows ``k0 …`` from the runtime layout: each packed word is
    loaded once and split by shifts into its codes (a (words, per, N) tensor reshaped to (K, N)).
    (Loading each code's word separately, ``per`` loads of every word, ran 1.0–2.5× slower on an H100.)"""
    PER: tl.constexpr = 32 // LO_BITS
    mn = offs_n < N
    rows = k0 // PER + tl.arange(0, BLOCK_K // PER)
    words = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=(rows < K // PER)[:, None] & mn[None, :], other=0)
    shifts = tl.arange(0, PER) * LO_BITS
    codes = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & ((1 << LO_BITS) - 1), (BLOCK_K, BLOCK_N))
    if HAS_HI:
        hrows = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        hw = tl.load(qhi_ptr + hrows[:, None] * N + offs_n[None, :], mask=(hrows < K // 32)[:, None] & mn[None, :],
                     other=0)
        hi = tl.reshape((hw[:, None, :] >> tl.arange(0, 32)[None, :, None]) & 1, (BLOCK_K, BLOCK_N))
        codes = codes | (hi << LO_BITS)
    return codes


@triton.jit
def _group_rows(scales_ptr, zeros_ptr, g0, offs_n, N):
    """Scale and zero (fp32, (BLOCK_N,)) of group ``g0``, for a K tile that lies inside one group."""
    mn = offs_n < N
    scale = tl.load(scales_ptr + g0 * N + offs_n, mask=mn, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + g0 * N + offs_n, mask=mn, other=0).to(tl.float32)
    return scale, zero


@triton.jit
def _dequant_rows(codes, scales_ptr, zeros_ptr, gidx_ptr, offs_k, offs_n, N, K):
    """fp32 weights (BLOCK_K, BLOCK_N), each row's group read from ``g_idx`` (act-order checkpoints)."""
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    g = tl.load(gidx_ptr + offs_k, mask=offs_k < K, other=0)
    scale = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0)
    return (codes - zero).to(tl.float32) * scale


@triton.jit
def _qgemv_kernel(x_ptr, qw_ptr, qhi_ptr, scales_ptr, zeros_ptr, gidx_ptr, out_ptr, M, N, K,
                  stride_xm, stride_xk, LO_BITS: tl.constexpr, HAS_HI: tl.constexpr, GS: tl.constexpr,
                  ONE_GROUP: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """Batch ≤ 8, all rows in one program (the weight tile is read once); split-K, atomic adds.
    ``ONE_GROUP``: a K tile lies in one group, so ``Σ a·(q − z)·s = s·(Σ a·q − z·Σ a)`` per tile."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, ROWS)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)  # (ROWS, BK)
        codes = _codes(qw_ptr, qhi_ptr, k0, offs_n, N, K, LO_BITS, HAS_HI, BLOCK_K, BLOCK_N)
        if ONE_GROUP:
            scale, zero = _group_rows(scales_ptr, zeros_ptr, k0 // GS, offs_n, N)
            part = tl.sum(a[:, :, None] * codes.to(tl.float32)[None, :, :], axis=1)  # (ROWS, BN)
            acc += (part - tl.sum(a, axis=1)[:, None] * zero[None, :]) * scale[None, :]
        else:
            w = _dequant_rows(codes, scales_ptr, zeros_ptr, gidx_ptr, offs_k, offs_n, N, K)
            acc += tl.sum(a[:, :, None] * w[None, :, :], axis=1)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.atomic_add(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def _qgemm_kernel(x_ptr, qw_ptr, qhi_ptr, scales_ptr, zeros_ptr, gidx_ptr, out_ptr, M, N, K,
                  stride_xm, stride_xk, LO_BITS: tl.constexpr, HAS_HI: tl.constexpr, GS: tl.constexpr,
                  ONE_GROUP: tl.constexpr, UPCAST: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """Batch > 8: ``BLOCK_M × BLOCK_N`` tiles through ``tl.dot``. In one group per tile the codes enter
    the dot as they are (small integers are exact in fp16 and bf16); scale and zero come after."""
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
        codes = _codes(qw_ptr, qhi_ptr, k0, offs_n, N, K, LO_BITS, HAS_HI, BLOCK_K, BLOCK_N)
        if ONE_GROUP:
            scale, zero = _group_rows(scales_ptr, zeros_ptr, k0 // GS, offs_n, N)
            if UPCAST:  # fp32 inputs, or bf16 under the interpreter (its bf16 tl.dot is wrong)
                part = tl.dot(a.to(tl.float32), codes.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(a, codes.to(a.dtype))
            acc += (part - tl.sum(a.to(tl.float32), axis=1)[:, None] * zero[None, :]) * scale[None, :]
        else:
            w = _dequant_rows(codes, scales_ptr, zeros_ptr, gidx_ptr, offs_k, offs_n, N, K)
            if UPCAST:
                acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(a, w.to(a.dtype))
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.atomic_add(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def _dequant_kernel(qw_ptr, qhi_ptr, scales_ptr, zeros_ptr, gidx_ptr, out_ptr, N, K, LO_BITS: tl.constexpr,
                    HAS_HI: tl.constexpr, GS: tl.constexpr, ONE_GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """The whole weight, transposed, (K, N) in ``out_ptr``'s dtype: for large batches, where cuBLAS
    on the dequantized weight beats dequantizing inside every output tile."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    codes = _codes(qw_ptr, qhi_ptr, k0, offs_n, N, K, LO_BITS, HAS_HI, BLOCK_K, BLOCK_N)
    if ONE_GROUP:
        scale, zero = _group_rows(scales_ptr, zeros_ptr, k0 // GS, offs_n, N)
        w = (codes.to(tl.float32) - zero[None, :]) * scale[None, :]
    else:
        w = _dequant_rows(codes, scales_ptr, zeros_ptr, gidx_ptr, offs_k, offs_n, N, K)
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(offs_k < K)[:, None] & (offs_n < N)[None, :])


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
    return 1 << max(0, (m - 1).bit_length())


DEQUANT_MIN_ROWS = 128  # from this batch up: dequantize to the activation dtype, then cuBLAS


@functools.lru_cache(maxsize=None)
def _sms(device: torch.device) -> int:
    """Multiprocessors of ``device``, asked once (qmatmul runs per layer and token)."""
    return 4 if INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count


def _split_k(tiles: int, K: int, block_k: int, sms: int, most: int) -> int:
    """Smallest power-of-two split of K that puts about four programs on every SM."""
    sk = 1
    while tiles * sk < 4 * sms and sk < most and K >= 2 * sk * block_k:
        sk *= 2
    return sk


def _k_tile(block_k: int, gs: int) -> tuple[int, bool]:
    """(K tile, whether each tile lies inside one group): a tile inside one group when the groups allow
    it (``gs`` ≥ 64, a power of two: tile sizes must be), else the default."""
    bk = min(block_k, gs) if gs >= 64 and gs & (gs - 1) == 0 else block_k
    return bk, gs > 0 and gs % bk == 0


def dequantize_t(layer: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight, transposed, (in, out) in ``dtype``, by one Triton kernel."""
    rt = runtime_layout(layer)
    K, N, gs = layer.in_features, layer.out_features, rt["gs"]
    (bk, one_group), bn = _k_tile(64, gs), 64 if INTERPRET else 128
    out = torch.empty(K, N, dtype=dtype, device=layer.qweight.device)
    _dequant_kernel[(triton.cdiv(K, bk), triton.cdiv(N, bn))](
        rt["qw"], rt["qhi"], rt["scales"], rt["zeros"], rt["g_idx"], out, N, K, LO_BITS=rt["lo_bits"],
        HAS_HI=rt["has_hi"], GS=gs, ONE_GROUP=one_group, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return out


def qmatmul(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """``x`` (..., in) -> (..., out) in ``x``'s dtype.

    Tile sizes follow fixed rules of the shape rather than autotuning, which would compile every
    candidate config per bit width and batch size and make a model's first forward pass take minutes."""
    rt = runtime_layout(layer)
    x2 = x.reshape(-1, layer.in_features)  # (M, K)
    M, K, N = x2.shape[0], layer.in_features, layer.out_features
    gs = rt["gs"]
    if M >= DEQUANT_MIN_ROWS:
        y = x2 @ dequantize_t(layer, x.dtype)
        if layer.bias is not None:
            y += layer.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], N)
    out = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    args = (x2, rt["qw"], rt["qhi"], rt["scales"], rt["zeros"], rt["g_idx"], out, M, N, K, x2.stride(0), x2.stride(1))
    common = dict(LO_BITS=rt["lo_bits"], HAS_HI=rt["has_hi"], GS=gs)
    if M <= GEMV_MAX_ROWS:
        rows = _bucket(M)
        bn, bk = (32, 64) if INTERPRET else (64, 128) if rows == 1 else (64, 64) if rows <= 4 else (32, 64)
        bk, one_group = _k_tile(bk, gs)
        sk = _split_k(triton.cdiv(N, bn), K, bk, _sms(x.device), 16)
        _qgemv_kernel[(triton.cdiv(N, bn), sk)](*args, **common, ONE_GROUP=one_group, ROWS=rows,
                                                 BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=4)
    else:
        bm = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
        bn, bk = (32, 64) if INTERPRET else (128, 64) if bm == 128 else (64, 64)
        bk, one_group = _k_tile(bk, gs)
        sk = _split_k(triton.cdiv(N, bn) * triton.cdiv(M, bm), K, bk, _sms(x.device), 8)
        upcast = x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16)
        _qgemm_kernel[(triton.cdiv(N, bn), sk, triton.cdiv(M, bm))](
            *args, **common, ONE_GROUP=one_group, UPCAST=upcast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            SPLIT_K=sk, num_warps=8 if bm * bn >= 128 * 128 else 4, num_stages=3)
    if layer.bias is not None:
        out += layer.bias.to(torch.float32)
    return out.to(x.dtype).reshape(*x.shape[:-1], N)


@register_kernel("triton")
def triton_kernel(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return qmatmul(x, layer)
