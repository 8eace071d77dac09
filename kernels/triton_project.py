"""Fused Triton restore: (RMSNorm) -> K/V GEMM -> bias -> RoPE on K -> scatter into the pool.

One program computes a ``[BLOCK_M tokens, head_dim]`` tile of ONE output head:
program axis 0 runs over ``2 * num_kv_heads`` heads (K heads, then V heads; adjacent
programs share the same hidden-state tile in L2), axis 1 over token tiles.
The head's columns are split into three accumulators so that RoPE pairs meet
in registers without a second GEMM or a shuffle:

    neox  : acc1 = dims [0, R/2),      acc2 = dims [R/2, R)      (rotate halves)
    GPT-J : acc1 = dims 0, 2, .., R-2, acc2 = dims 1, 3, .., R-1 (interleaved pairs)
    accp  = dims [R, head_dim) (partial rotary: passed through), R = rotary_dim

The K-loop walks ``hidden_size`` in BLOCK_K steps with ``tl.dot`` (fp32 accumulate).
The epilogue adds the bias, rounds to the model dtype (the value the model's
``qkv_proj`` hands to its rotary embedding), rotates K in fp32 with cos/sin
gathered at each token's position, and stores each row straight to
``cache[kv_indices[m], head, :]``. V heads skip the rotation.

Pre-norm inputs run one extra pass over the token tile for the RMS, then normalise
each ``[BLOCK_M, BLOCK_K]`` tile in the K-loop before the dot (same rounding as
``reference.rms_norm``).

Called by ``api.py`` after validation; under ``TRITON_INTERPRET=1`` (set before
this module is imported) it runs on CPU tensors.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .projection import KVProjection

_MIN_DOT = 16  # tl.dot needs every block dim >= 16


@triton.jit
def _project_kv_kernel(
    x_ptr, w_ptr, b_ptr, norm_w_ptr, cos_sin_ptr, pos_ptr, idx_ptr, k_ptr, v_ptr,
    n_tokens, hidden, norm_eps,
    stride_xm, stride_wn, stride_cs,
    stride_ks, stride_kh, stride_vs, stride_vh,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr,
    IS_NEOX: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr,
    HAS_PASS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    head = tl.program_id(0)  # [0, NUM_KV_HEADS): K heads, then V heads
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n_tokens

    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < ROT_HALF
    if IS_NEOX:
        col1 = offs_r
        col2 = offs_r + ROT_HALF
    else:
        col1 = 2 * offs_r
        col2 = 2 * offs_r + 1
    offs_p = tl.arange(0, BLOCK_P)
    p_mask = offs_p < HEAD_DIM - 2 * ROT_HALF
    colp = 2 * ROT_HALF + offs_p
    row0 = head * HEAD_DIM  # first weight row of this head (K rows, then V rows)
    act_dtype = x_ptr.dtype.element_ty

    if HAS_NORM:
        sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=m_mask[:, None] & (offs_k < hidden)[None, :], other=0.0)
            x = x.to(tl.float32)
            sumsq += tl.sum(x * x, axis=1)
        rstd = 1.0 / tl.sqrt(sumsq / hidden + norm_eps)

    acc1 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    accp = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < hidden
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_NORM:
            nw = tl.load(norm_w_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            x = ((x.to(tl.float32) * rstd[:, None]) * nw[None, :]).to(act_dtype)
        if DOT_IN_FP32:
            x = x.to(tl.float32)
        w_k = w_ptr + offs_k[:, None]
        w1 = tl.load(w_k + (row0 + col1)[None, :] * stride_wn,
                     mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        w2 = tl.load(w_k + (row0 + col2)[None, :] * stride_wn,
                     mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if DOT_IN_FP32:
            w1 = w1.to(tl.float32)
            w2 = w2.to(tl.float32)
        acc1 = tl.dot(x, w1, acc1, input_precision=DOT_PRECISION)
        acc2 = tl.dot(x, w2, acc2, input_precision=DOT_PRECISION)
        if HAS_PASS:
            wp = tl.load(w_k + (row0 + colp)[None, :] * stride_wn,
                         mask=k_mask[:, None] & p_mask[None, :], other=0.0)
            if DOT_IN_FP32:
                wp = wp.to(tl.float32)
            accp = tl.dot(x, wp, accp, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc1 += tl.load(b_ptr + row0 + col1, mask=r_mask, other=0.0).to(tl.float32)[None, :]
        acc2 += tl.load(b_ptr + row0 + col2, mask=r_mask, other=0.0).to(tl.float32)[None, :]
        accp += tl.load(b_ptr + row0 + colp, mask=p_mask, other=0.0).to(tl.float32)[None, :]
    # The model's qkv_proj output is in the activation dtype before RoPE sees it.
    a1 = acc1.to(act_dtype).to(tl.float32)
    a2 = acc2.to(act_dtype).to(tl.float32)
    ap = accp.to(act_dtype)

    slots = tl.load(idx_ptr + offs_m, mask=m_mask, other=0)
    mr = m_mask[:, None] & r_mask[None, :]
    mp = m_mask[:, None] & p_mask[None, :]
    if head < NUM_KV_HEADS:
        pos = tl.load(pos_ptr + offs_m, mask=m_mask, other=0)
        cs = cos_sin_ptr + pos[:, None] * stride_cs + offs_r[None, :]
        cos = tl.load(cs, mask=mr, other=0.0).to(tl.float32)
        sin = tl.load(cs + ROT_HALF, mask=mr, other=0.0).to(tl.float32)
        o1 = a1 * cos - a2 * sin
        o2 = a2 * cos + a1 * sin
        out = k_ptr + slots[:, None] * stride_ks + head * stride_kh
        tl.store(out + col1[None, :], o1.to(k_ptr.dtype.element_ty), mask=mr)
        tl.store(out + col2[None, :], o2.to(k_ptr.dtype.element_ty), mask=mr)
        if HAS_PASS:
            tl.store(out + colp[None, :], ap.to(k_ptr.dtype.element_ty), mask=mp)
    else:
        out = v_ptr + slots[:, None] * stride_vs + (head - NUM_KV_HEADS) * stride_vh
        tl.store(out + col1[None, :], a1.to(v_ptr.dtype.element_ty), mask=mr)
        tl.store(out + col2[None, :], a2.to(v_ptr.dtype.element_ty), mask=mr)
        if HAS_PASS:
            tl.store(out + colp[None, :], ap.to(v_ptr.dtype.element_ty), mask=mp)


@triton.jit
def _copy_kv_kernel(kv_ptr, idx_ptr, k_ptr, v_ptr, stride_kv_n, stride_kv_2, stride_ks,
                    stride_vs, ROW: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(0)
    which = tl.program_id(1)  # 0: K, 1: V
    slot = tl.load(idx_ptr + m)
    offs = tl.arange(0, BLOCK)
    for c0 in range(0, ROW, BLOCK):
        mask = c0 + offs < ROW
        row = tl.load(kv_ptr + m * stride_kv_n + which * stride_kv_2 + c0 + offs, mask=mask)
        if which == 0:
            tl.store(k_ptr + slot * stride_ks + c0 + offs, row.to(k_ptr.dtype.element_ty),
                     mask=mask)
        else:
            tl.store(v_ptr + slot * stride_vs + c0 + offs, row.to(v_ptr.dtype.element_ty),
                     mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block(n: int) -> int:
    return max(_MIN_DOT, triton.next_power_of_2(max(n, 1)))


def project_kv_into_cache(
    hidden: Tensor,
    positions: Tensor,
    proj: KVProjection,
    k_cache: Tensor,
    v_cache: Tensor,
    kv_indices: Tensor,
) -> None:
    """Fused ``api.project_kv_into_cache`` (inputs already validated)."""
    n, hidden_size = hidden.shape
    weight = proj.weight if proj.weight.stride(1) == 1 else proj.weight.contiguous()
    cos_sin = proj.cos_sin_cache
    if cos_sin.stride(1) != 1:
        cos_sin = cos_sin.contiguous()
    rot_half = proj.rotary_dim // 2
    interpret = _interpreting()
    if interpret:  # the interpreter is slow: small tiles keep tests quick
        block_m, block_k, num_warps, num_stages = 16, 32, 1, 1
    else:
        block_m = 64 if n >= 64 else (32 if n > 16 else 16)
        block_k, num_warps, num_stages = 64, 4, 3
    grid = (2 * proj.num_kv_heads, triton.cdiv(n, block_m))
    _project_kv_kernel[grid](
        hidden, weight,
        proj.bias if proj.bias is not None else weight,
        proj.norm_weight if proj.norm_weight is not None else weight,
        cos_sin, positions, kv_indices, k_cache, v_cache,
        n, hidden_size, float(proj.norm_eps),
        hidden.stride(0), weight.stride(0), cos_sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        NUM_KV_HEADS=proj.num_kv_heads, HEAD_DIM=proj.head_dim, ROT_HALF=rot_half,
        IS_NEOX=proj.is_neox_style, HAS_BIAS=proj.bias is not None,
        HAS_NORM=proj.norm_weight is not None, HAS_PASS=proj.rotary_dim < proj.head_dim,
        # fp32 restores must not silently drop to TF32 on tensor cores.
        DOT_PRECISION="ieee" if hidden.dtype == torch.float32 or interpret else None,
        # The interpreter's tl.dot is wrong for bf16 operands (triton 3.8); fp32
        # operands give the same products (bf16/fp16 products are exact in fp32).
        DOT_IN_FP32=interpret,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=_block(rot_half),
        BLOCK_P=_block(proj.head_dim - proj.rotary_dim),
        num_warps=num_warps, num_stages=num_stages,
    )


def copy_kv_into_cache(kv: Tensor, k_cache: Tensor, v_cache: Tensor, kv_indices: Tensor) -> None:
    """Scatter ``api.copy_kv_into_cache`` (inputs already validated)."""
    n = kv.shape[0]
    row = kv.shape[2] * kv.shape[3]
    block = min(triton.next_power_of_2(row), 4096)
    _copy_kv_kernel[(n, 2)](
        kv, kv_indices, k_cache, v_cache, kv.stride(0), kv.stride(1),
        k_cache.stride(0), v_cache.stride(0), ROW=row, BLOCK=block,
    )
