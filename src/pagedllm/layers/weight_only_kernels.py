"""Triton kernel for weight-only quantised products (layers/weight_only.py): out = x · Wᵀ with W
held as integers in groups. Each program computes a [BLOCK_M, BLOCK_N] tile of the output; per
step along the inputs it loads a [BLOCK_N, BLOCK_K] tile of integer weights, dequantises it in
registers (q · scale + min) to x's dtype and accumulates tl.dot in float32. A 4-bit tile arrives as
two halves (low and high nibbles, the packing of weight_only.py), multiplied separately.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .weight_only import GroupQuantized


@triton.jit
def _dequant_tile(q, s_ptr, m_ptr, rn, cols, stride_s, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, n_mask, dtype):
    """q [BLOCK_N, k] integer values → float weights for input columns `cols` [k]."""
    group_index = rn[:, None] * stride_s + cols[None, :] // GROUP
    w = q.to(tl.float32) * tl.load(s_ptr + group_index, mask=n_mask[:, None], other=0.0).to(tl.float32)
    if HAS_MIN:
        w += tl.load(m_ptr + group_index, mask=n_mask[:, None], other=0.0).to(tl.float32)
    return w.to(dtype)


@triton.jit
def weight_only_matmul_kernel(x_ptr, q_ptr, s_ptr, m_ptr, out_ptr, M, N, K,
                              stride_xm, stride_qn, stride_s, stride_om,
                              GROUP: tl.constexpr, HAS_MIN: tl.constexpr, INT4: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              PRECISION: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if INT4:
            half = tl.arange(0, BLOCK_K // 2)
            packed = tl.load(q_ptr + rn[:, None] * stride_qn + k0 // 2 + half[None, :], mask=n_mask[:, None], other=0)
            for part in tl.static_range(2):  # low nibbles: columns k0.., high: k0 + BLOCK_K/2..
                cols = k0 + part * (BLOCK_K // 2) + half
                q = (packed >> (4 * part)) & 0x0F
                w = _dequant_tile(q, s_ptr, m_ptr, rn, cols, stride_s, GROUP, HAS_MIN, n_mask, dtype)
                x = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :], mask=m_mask[:, None], other=0.0)
                acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        else:
            cols = k0 + tl.arange(0, BLOCK_K)
            q = tl.load(q_ptr + rn[:, None] * stride_qn + cols[None, :], mask=n_mask[:, None], other=0)
            w = _dequant_tile(q, s_ptr, m_ptr, rn, cols, stride_s, GROUP, HAS_MIN, n_mask, dtype)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :], mask=m_mask[:, None], other=0.0)
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    out = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def weight_only_matmul(x: torch.Tensor, w: GroupQuantized) -> torch.Tensor:
    """x [M, K] (float16, bfloat16 or float32) · Wᵀ → [M, N] in x's dtype."""
    x = x.contiguous()
    M, K = x.shape
    out = torch.empty(M, w.rows, dtype=x.dtype, device=x.device)
    block_m = 16 if M <= 16 else 64  # tl.dot's smallest tile: a decode step pads its rows to 16
    block_k = w.tile if w.bits == 4 else (64 if K % 64 == 0 else 32)
    block_n = 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(w.rows, block_n))
    scale_min = w.min if w.min is not None else w.scale
    weight_only_matmul_kernel[grid](
        x, w.q, w.scale, scale_min, out, M, w.rows, K, x.stride(0), w.q.stride(0), w.scale.stride(0), out.stride(0),
        GROUP=w.group, HAS_MIN=w.min is not None, INT4=w.bits == 4, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    return out
