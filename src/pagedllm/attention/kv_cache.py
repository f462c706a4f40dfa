"""The paged KV pool's rows: K/V written to their slots, and 8-bit (q8_0) rows read back.

K/V live in one pool of fixed-size blocks per layer, shaped [2, num_blocks, block_size,
kv_heads, row] (every backend's layout; `row` = head_dim, or q8_0 bytes).
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


# An 8-bit KV cache (`--kv-cache-dtype q8_0`) stores each head row as llama.cpp's q8_0 blocks: per
# 32 values, a float16 scale d then 32 int8 q, value = d·q. The pool's elements are then bytes, a
# row of head_dim values taking head_dim / 32 · 34 of them (the kernels work it out the same way).
Q8_0_VALUES, Q8_0_BYTES = 32, 34
KV_Q8_0 = torch.uint8  # the pool dtype that means q8_0 rows


def kv_row_elements(head_dim: int, kv_dtype: torch.dtype) -> int:
    """Pool elements per cached head row."""
    return head_dim // Q8_0_VALUES * Q8_0_BYTES if kv_dtype == KV_Q8_0 else head_dim


def kv_bytes_per_token(config: ModelConfig, kv_dtype: torch.dtype, kv_heads: int | None = None) -> int:
    """What one token's K and V (latent attention: its one row) take over all attention layers in a pool of
    `kv_dtype` (KV_Q8_0: q8_0 rows); `kv_heads`: the heads one pool holds (a tensor-parallel rank's), by
    default the model's."""
    row_bytes = kv_row_elements(config.kv_row_dim, kv_dtype) * kv_dtype.itemsize
    return config.kv_halves * len(config.attention_layers) * (kv_heads or config.cached_kv_heads) * row_bytes


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """[..., dim] floats → [..., dim / 32 · 34] bytes (round half to even, as the C++ writers)."""
    blocks = x.float().unflatten(-1, (-1, Q8_0_VALUES))
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(blocks * inverse).clamp_(-127, 127).to(torch.int8)
    packed = torch.cat([d.half().view(torch.uint8), q.view(torch.uint8)], dim=-1)
    return packed.flatten(-2)


def dequantize_q8_0(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    blocks = packed.unflatten(-1, (-1, Q8_0_BYTES))
    d = blocks[..., :2].contiguous().view(torch.float16).to(dtype)
    return (blocks[..., 2:].contiguous().view(torch.int8).to(dtype) * d).flatten(-2)


def cached_values(kv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cache rows read back as `dtype` values."""
    return dequantize_q8_0(kv, dtype) if kv.dtype == KV_Q8_0 else kv.to(dtype)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, slot_mapping: torch.Tensor) -> None:
    """k and v of each token to its slot; a latent pool (one row a token, no V half) takes k only."""
    halves, num_blocks, block_size, kv_heads, row = kv_cache.shape
    flat = kv_cache.view(halves, num_blocks * block_size, kv_heads, row)
    for index, x in enumerate((k, v)[:halves]):
        flat[index].index_copy_(0, slot_mapping, quantize_q8_0(x) if kv_cache.dtype == KV_Q8_0 else x.to(kv_cache.dtype))
