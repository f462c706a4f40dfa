"""Paged attention with plain torch ops (the CPU backend; it also runs on CUDA).

K/V live in one pool of fixed-size blocks per layer, shaped [2, num_blocks, block_size,
kv_heads, head_dim]. Each step's new tokens are written to their slots, then each group of
sequences gathers its keys through its block tables and is attended with one batched SDPA call
over a padded [sequences, max_query_len] layout. Decodes (one query each) and prefill chunks are
separate groups, so a long chunk never pads every decode to its length. No loop over sequences.
On the CPU, a decode group can instead go to a C++ kernel that reads the blocks in place
(`pagedllm.kernels`): same result, no gather, no padding, no mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..kernels import paged_decode_attention


@dataclass
class AttentionGroup:
    """Sequences attended together.

    rows:          [tokens] where the group's tokens sit in the step's flat batch.
    block_tables:  [seqs, max_blocks] blocks of each sequence, padded with 0.
    token_seq:     [tokens] which of the group's sequences each token belongs to.
    token_index:   [tokens] index of the token among its sequence's new tokens.
    positions_padded: [seqs, max_query_len] absolute positions, padded rows at position 0.
    context_lens:  [seqs] tokens of each sequence in the cache once this step is written.
    max_context_len: the longest of them.
    use_decode_kernel: attend with the C++ decode kernel (one query per sequence, CPU, float32).
    from_start:    every sequence's new tokens start at position 0 (no cached prefix), so the plain
                   causal mask is the mask and SDPA can skip the blocks above the diagonal.
    """

    rows: torch.Tensor
    block_tables: torch.Tensor
    token_seq: torch.Tensor
    token_index: torch.Tensor
    positions_padded: torch.Tensor
    context_lens: torch.Tensor
    max_context_len: int
    use_decode_kernel: bool = False
    from_start: bool = False

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]

    @property
    def max_query_len(self) -> int:
        return self.positions_padded.shape[1]


@dataclass
class AttentionMetadata:
    """Where one step's flat batch of tokens sits in the paged cache."""

    slot_mapping: torch.Tensor  # [tokens] cache slot (block * block_size + offset) each token writes to
    groups: list[AttentionGroup]


def build_attention_mask(group: AttentionGroup, sliding_window: int | None) -> torch.Tensor | None:
    """[seqs, 1, max_query_len, max_context_len] boolean: causal, within the window; None for the decode
    kernel, and for a causal mask that SDPA builds itself (`from_start`, no window cutting in)."""
    if group.use_decode_kernel or (group.from_start and (sliding_window is None or group.max_context_len <= sliding_window)):
        return None
    return causal_mask(group, sliding_window)


def causal_mask(group: AttentionGroup, sliding_window: int | None) -> torch.Tensor:
    """The mask build_attention_mask describes, always built."""
    key_pos = torch.arange(group.max_context_len, device=group.positions_padded.device)
    query_pos = group.positions_padded[:, :, None]
    mask = key_pos[None, None, :] <= query_pos
    if sliding_window is not None:
        mask &= key_pos[None, None, :] > query_pos - sliding_window
    return mask[:, None]


class AttentionMasks:
    """One step's masks: each group's, per sliding window, built when a layer with that window first
    asks (a model whose layers alternate windows builds two sets, not one per layer)."""

    def __init__(self, meta: AttentionMetadata):
        self.meta = meta
        self._by_window: dict[int | None, list[torch.Tensor | None]] = {}

    def for_window(self, sliding_window: int | None) -> list[torch.Tensor | None]:
        if sliding_window not in self._by_window:
            self._by_window[sliding_window] = [build_attention_mask(g, sliding_window) for g in self.meta.groups]
        return self._by_window[sliding_window]


# An 8-bit KV cache (`--kv-cache-dtype q8_0`) stores each head row as llama.cpp's q8_0 blocks: per
# 32 values, a float16 scale d then 32 int8 q, value = d·q. The pool's elements are then bytes, a
# row of head_dim values taking head_dim / 32 · 34 of them (the kernels work it out the same way).
Q8_0_VALUES, Q8_0_BYTES = 32, 34
KV_Q8_0 = torch.uint8  # the pool dtype that means q8_0 rows


def kv_row_elements(head_dim: int, kv_dtype: torch.dtype) -> int:
    """Pool elements per cached head row."""
    return head_dim // Q8_0_VALUES * Q8_0_BYTES if kv_dtype == KV_Q8_0 else head_dim


def kv_bytes_per_token(config: ModelConfig, kv_dtype: torch.dtype) -> int:
    """What one token's K and V take over all layers in a pool of `kv_dtype` (KV_Q8_0: q8_0 rows)."""
    row_bytes = kv_row_elements(config.head_dim, kv_dtype) * kv_dtype.itemsize
    return 2 * config.num_hidden_layers * config.num_key_value_heads * row_bytes


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


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    _, num_blocks, block_size, kv_heads, row = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, kv_heads, row)
    for index, x in enumerate((k, v)):
        flat[index].index_copy_(0, slot_mapping, quantize_q8_0(x) if kv_cache.dtype == KV_Q8_0 else x.to(kv_cache.dtype))


# Query rows per chunk of the bfloat16 causal path (64-256 measured alike; all 512 at once 1.5x slower).
_CAUSAL_CHUNK = 128


def _causal_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                              dtype: torch.dtype) -> torch.Tensor:
    """Causal attention from position 0 — q [seqs, heads, len, dim], k and v [seqs, kv_heads, len, dim] —
    with both products in `dtype` GEMMs; the softmax reads the `dtype` scores and sums in float32
    (torch's reduced-precision softmax), so the scores are never widened in memory. A chunk of
    queries reads only the keys up to its last row. Returns [seqs, heads, len, dim] in `dtype`."""
    seqs, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    q = (q * scale).to(dtype).unflatten(1, (kv_heads, heads // kv_heads))  # [seqs, kv_heads, group, len, dim]
    k, v = k.to(dtype).unsqueeze(2), v.to(dtype).unsqueeze(2)
    out = torch.empty_like(q)
    future = torch.ones(_CAUSAL_CHUNK, _CAUSAL_CHUNK, dtype=torch.bool, device=q.device).triu_(1)
    for start in range(0, length, _CAUSAL_CHUNK):
        end = min(length, start + _CAUSAL_CHUNK)
        scores = torch.matmul(q[..., start:end, :], k[..., :end, :].transpose(-1, -2))
        scores[..., start:].masked_fill_(future[: end - start, : end - start], float("-inf"))  # earlier keys: all seen
        out[..., start:end, :] = torch.matmul(scores.softmax(-1), v[..., :end, :])
    return out.flatten(1, 2)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al.; BLOOM's and Baichuan-13B's, llama.cpp's with max bias 8):
    a geometric series from 2^(-8/n) for the nearest power of two n, then every other slope of 2n."""
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = [2 ** (-8 * i / closest) for i in range(1, closest + 1)]
    slopes += [2 ** (-8 * i / (2 * closest)) for i in range(1, 2 * (num_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def _modified_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                        softcap: float | None, alibi: torch.Tensor | None, query_pos: torch.Tensor) -> torch.Tensor:
    """Attention with explicit scores: soft-capped (cap · tanh(s / cap), Gemma 2) and/or with ALiBi's
    slope · (key position − query position) added, then the mask and a float32 softmax.
    q [seqs, heads, len, dim]; k, v [seqs, kv_heads, ctx, dim]; query_pos [seqs, len]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi is not None:
        distance = torch.arange(k.shape[2], device=q.device)[None, None, :] - query_pos[:, :, None]
        scores = scores + alibi[None, :, None, None] * distance[:, None].to(scores.dtype)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), v)


def _attend_group(q: torch.Tensor, kv_cache: torch.Tensor, group: AttentionGroup, mask: torch.Tensor | None,
                  scale: float, sliding_window: int | None, matmul_dtype: torch.dtype | None,
                  softcap: float | None = None, alibi: torch.Tensor | None = None) -> torch.Tensor:
    if group.use_decode_kernel:
        return paged_decode_attention(q, kv_cache, group.block_tables, group.context_lens, scale, sliding_window,
                                      softcap, alibi)
    length = group.max_context_len
    keys = cached_values(kv_cache[0][group.block_tables].flatten(1, 2)[:, :length], q.dtype).transpose(1, 2)
    values = cached_values(kv_cache[1][group.block_tables].flatten(1, 2)[:, :length], q.dtype).transpose(1, 2)
    queries = q.new_zeros(group.num_seqs, group.max_query_len, q.shape[1], q.shape[2])
    queries[group.token_seq, group.token_index] = q
    if softcap is not None or alibi is not None:
        mask = mask if mask is not None else causal_mask(group, sliding_window)
        out = _modified_attention(queries.transpose(1, 2), keys, values, mask, scale, softcap, alibi,
                                  group.positions_padded)
    elif mask is None and matmul_dtype not in (None, q.dtype):
        out = _causal_attention_chunked(queries.transpose(1, 2), keys, values, scale, matmul_dtype).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(queries.transpose(1, 2), keys, values, attn_mask=mask, scale=scale,
                                             is_causal=mask is None, enable_gqa=True)
    return out.transpose(1, 2)[group.token_seq, group.token_index]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, masks: list[torch.Tensor | None], scale: float,
                    sliding_window: int | None, matmul_dtype: torch.dtype | None = None,
                    softcap: float | None = None, alibi: torch.Tensor | None = None) -> torch.Tensor:
    """q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim]. Returns [tokens, heads, dim].

    `matmul_dtype`: where the layer's own products run in a narrower dtype (bfloat16 GEMMs over
    packed weights), a prefill from position 0 computes its scores and weighted sum in it too.
    `softcap`: the scores are soft-capped; `alibi`: per-head slopes of ALiBi's distance bias."""
    write_kv(kv_cache, k, v, meta.slot_mapping)
    return attend(q, kv_cache, meta, masks, scale, sliding_window, matmul_dtype, softcap, alibi)


def attend(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, masks: list[torch.Tensor | None],
           scale: float, sliding_window: int | None, matmul_dtype: torch.dtype | None = None,
           softcap: float | None = None, alibi: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q over the cache, this step's K/V already written. Returns [tokens, heads, dim]."""
    if len(meta.groups) == 1:
        return _attend_group(q, kv_cache, meta.groups[0], masks[0], scale, sliding_window, matmul_dtype, softcap,
                             alibi)
    out = torch.empty_like(q)
    for group, mask in zip(meta.groups, masks):
        out[group.rows] = _attend_group(q[group.rows], kv_cache, group, mask, scale, sliding_window, matmul_dtype,
                                        softcap, alibi)
    return out
