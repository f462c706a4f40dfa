"""Paged attention with plain torch ops (the CPU backend; it also runs on CUDA).

K/V live in one pool of fixed-size blocks per layer, shaped [2, num_blocks, block_size,
kv_heads, head_dim]. Each step's new tokens are written to their slots, then every sequence's
keys are gathered through its block table and attended with one batched SDPA call over a
padded [sequences, max_query_len] layout. No Python loop over sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where one step's flat batch of tokens sits in the paged cache.

    slot_mapping:  [tokens] cache slot (block * block_size + offset) each new token writes to.
    block_tables:  [seqs, max_blocks] blocks of each sequence, padded with 0.
    token_seq:     [tokens] which sequence each token belongs to.
    token_index:   [tokens] index of the token among its sequence's new tokens.
    positions_padded: [seqs, max_query_len] absolute positions, padded rows at position 0.
    context_lens:  [seqs] tokens of each sequence in the cache once this step is written.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    token_seq: torch.Tensor
    token_index: torch.Tensor
    positions_padded: torch.Tensor
    context_lens: torch.Tensor
    max_context_len: int

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]

    @property
    def max_query_len(self) -> int:
        return self.positions_padded.shape[1]


def build_attention_mask(meta: AttentionMetadata, sliding_window: int | None) -> torch.Tensor:
    """[seqs, 1, max_query_len, max_context_len] boolean: causal, within the window."""
    key_pos = torch.arange(meta.max_context_len, device=meta.positions_padded.device)
    query_pos = meta.positions_padded[:, :, None]
    mask = key_pos[None, None, :] <= query_pos
    if sliding_window is not None:
        mask &= key_pos[None, None, :] > query_pos - sliding_window
    return mask[:, None]


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim]. Returns [tokens, heads, dim]."""
    write_kv(kv_cache, k, v, meta.slot_mapping)
    seqs, length = meta.num_seqs, meta.max_context_len
    keys = kv_cache[0][meta.block_tables].flatten(1, 2)[:, :length].transpose(1, 2)
    values = kv_cache[1][meta.block_tables].flatten(1, 2)[:, :length].transpose(1, 2)
    queries = q.new_zeros(seqs, meta.max_query_len, q.shape[1], q.shape[2])
    queries[meta.token_seq, meta.token_index] = q
    out = F.scaled_dot_product_attention(queries.transpose(1, 2), keys, values, attn_mask=mask,
                                         scale=scale, enable_gqa=True)
    return out.transpose(1, 2)[meta.token_seq, meta.token_index]
