"""The attention backend interface, and the plain-torch backend every device can run.

A backend builds its metadata from the step's layout (`build_metadata`), keeps the pool in the
layout it states (`kv_cache_shape`), and attends one layer: `forward` writes the step's K/V to their
slots and attends q over each sequence's cache. The model calls `attention()` (pagedllm.attention)
and nothing else: masks and padding are the backend's business.

The torch backend gathers each group's keys through its block tables and runs one batched SDPA call
over a padded [sequences × query length] layout with a causal (and sliding-window) mask; soft-capped
or ALiBi scores take an explicit-scores path. No loop over sequences.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from .. import kernels
from .kv_cache import cached_values, write_kv
from .metadata import AttentionGroup, AttentionMetadata, LayerAttention, StepLayout


class AttentionBackend(ABC):
    name: str
    supports_graphs = False  # whether graph_inputs holds all a step's attention reads (engine/cuda_graphs.py)
    supports_latent = False  # whether it attends latent pools (LayerAttention.value_dim; layers/mla.py)

    @classmethod
    def usable(cls, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
        """Whether this backend can run a model of `head_dim` in `dtype` on `device`."""
        return True

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, kv_heads: int, row: int, halves: int = 2) -> tuple[int, ...]:
        """One layer's pool: [K/V, blocks, block_size, kv_heads, row] (row: head_dim, or q8_0 bytes; `halves` 1:
        a latent pool's one row a token)."""
        return (halves, num_blocks, block_size, kv_heads, row)

    def build_metadata(self, layout: StepLayout) -> AttentionMetadata:
        return AttentionMetadata(layout.slot_mapping(), layout.decode_and_prefill_groups(), self)

    def graph_inputs(self, meta: AttentionMetadata) -> list[torch.Tensor]:
        """Every tensor of `meta` the backend's kernels read, in a fixed order: a captured graph keeps
        its own, and a replay copies the next step's (of the same shapes) into them."""
        raise NotImplementedError(f"the {self.name} attention backend cannot be captured in a graph")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, layer: LayerAttention, matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
        """q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim]. Returns [tokens, heads, dim].

        `matmul_dtype`: where the layer's own products run in a narrower dtype (bfloat16 GEMMs over
        packed weights), a prefill from position 0 may compute its scores and weighted sum in it too."""
        write_kv(kv_cache, k, v, meta.slot_mapping)
        return self.attend(q, kv_cache, meta, layer, matmul_dtype)

    @abstractmethod
    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, layer: LayerAttention,
               matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Attention of q over the cache, this step's K/V already written."""


class TorchBackend(AttentionBackend):
    name = "torch"
    supports_latent = True

    def attend(self, q, kv_cache, meta, layer, matmul_dtype=None):
        """Group by group (decodes and prefill chunks apart: padding stays within each group)."""
        if len(meta.groups) == 1:
            return self.attend_group(q, kv_cache, meta, meta.groups[0], 0, layer, matmul_dtype)
        out = q.new_empty(*q.shape[:-1], layer.value_dim or q.shape[-1])
        for index, group in enumerate(meta.groups):
            out[group.rows] = self.attend_group(q[group.rows], kv_cache, meta, group, index, layer, matmul_dtype)
        return out

    def attend_group(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, group: AttentionGroup,
                     index: int, layer: LayerAttention, matmul_dtype: torch.dtype | None) -> torch.Tensor:
        """Attention for one group's tokens (`index`: the group's place in meta.groups)."""
        length = group.max_context_len
        keys = cached_values(kv_cache[0][group.block_tables].flatten(1, 2)[:, :length], q.dtype).transpose(1, 2)
        if layer.value_dim is not None:  # a latent pool: each row's first value_dim entries are its value
            values = keys[..., :layer.value_dim]
        else:
            values = cached_values(kv_cache[1][group.block_tables].flatten(1, 2)[:, :length], q.dtype).transpose(1, 2)
        queries = q.new_zeros(group.num_seqs, group.max_query_len, q.shape[1], q.shape[2])
        queries[group.token_seq, group.token_index] = q
        queries = queries.transpose(1, 2)
        mask = _masks(meta, layer.sliding_window)[index]
        if layer.softcap is not None or layer.alibi is not None or layer.sinks is not None:
            mask = mask if mask is not None else causal_mask(group, layer.sliding_window)
            out = _explicit_scores_attention(queries, keys, values, mask, layer, group.positions_padded)
        elif mask is None and matmul_dtype not in (None, q.dtype):
            out = _causal_attention_chunked(queries, keys, values, layer.scale, matmul_dtype).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=layer.scale,
                                                 is_causal=mask is None, enable_gqa=True)
        return out.transpose(1, 2)[group.token_seq, group.token_index]


def build_attention_mask(group: AttentionGroup, sliding_window: int | None) -> torch.Tensor | None:
    """[seqs, 1, max_query_len, max_context_len] boolean: causal, within the window; None for the decode
    kernel, and for a causal mask that SDPA builds itself (`from_start`, no window cutting in)."""
    if group.use_decode_kernel or (group.from_start and (sliding_window is None or group.max_context_len <= sliding_window)):
        return None
    return causal_mask(group, sliding_window)


def causal_mask(group: AttentionGroup, sliding_window: int | None) -> torch.Tensor:
    """The mask build_attention_mask describes, always built."""
    return window_mask(group.positions_padded, group.max_context_len, sliding_window)


def window_mask(query_pos: torch.Tensor, context_len: int, sliding_window: int | None) -> torch.Tensor:
    """[seqs, 1, len, context_len] boolean: each query (positions [seqs, len]) sees the keys at or before
    it, within the window."""
    key_pos = torch.arange(context_len, device=query_pos.device)
    query_pos = query_pos[:, :, None]
    mask = key_pos[None, None, :] <= query_pos
    if sliding_window is not None:
        mask &= key_pos[None, None, :] > query_pos - sliding_window
    return mask[:, None]


def _masks(meta: AttentionMetadata, sliding_window: int | None) -> list[torch.Tensor | None]:
    """The step's masks for one window, one per group, built when a layer with that window first asks
    (a model whose layers alternate windows builds two sets, not one per layer)."""
    key = ("masks", sliding_window)
    if key not in meta.cache:
        meta.cache[key] = [build_attention_mask(g, sliding_window) for g in meta.groups]
    return meta.cache[key]


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al.; BLOOM's and Baichuan-13B's, llama.cpp's with max bias 8):
    a geometric series from 2^(-8/n) for the nearest power of two n, then every other slope of 2n."""
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = [2 ** (-8 * i / closest) for i in range(1, closest + 1)]
    slopes += [2 ** (-8 * i / (2 * closest)) for i in range(1, 2 * (num_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, layer: LayerAttention,
                      query_pos: torch.Tensor) -> torch.Tensor:
    """Softmax attention weights in float32, from explicit scores: soft-capped (cap · tanh(s / cap),
    Gemma 2) and/or with ALiBi's slope · (key position − query position) added, then the mask; with
    attention sinks, each head's sink logit joins the softmax and is dropped after (gpt-oss).
    q [seqs, heads, len, dim]; k [seqs, kv_heads, ctx, dim]; mask [seqs, 1, len, ctx]; query_pos [seqs, len].
    Returns [seqs, heads, len, ctx]."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * layer.scale
    if layer.softcap is not None:
        scores = torch.tanh(scores / layer.softcap) * layer.softcap
    if layer.alibi is not None:
        distance = torch.arange(k.shape[2], device=q.device)[None, None, :] - query_pos[:, :, None]
        scores = scores + layer.alibi[None, :, None, None] * distance[:, None].to(scores.dtype)
    scores = scores.masked_fill(~mask, float("-inf"))
    if layer.sinks is None:
        return scores.softmax(-1, dtype=torch.float32)
    sinks = layer.sinks.float()[None, :, None, None].expand(*scores.shape[:-1], 1)
    return torch.cat([scores.float(), sinks], dim=-1).softmax(-1)[..., :-1]


def _explicit_scores_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                               layer: LayerAttention, query_pos: torch.Tensor) -> torch.Tensor:
    """Attention through attention_weights (for what SDPA cannot express); v [seqs, kv_heads, ctx, dim]."""
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return torch.matmul(attention_weights(q, k, mask, layer, query_pos).to(q.dtype), v)


def _causal_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Scores [B, R, C] of queries at the last R of C positions → causal softmax weights (row r sees
    its first C − R + r + 1 keys), in place where it can be: bfloat16 on the CPU takes one C++ pass
    over the visible keys (float32 math); anything else, a −inf bias and torch's softmax."""
    rows, cols = scores.shape[-2:]
    if scores.dtype == torch.bfloat16 and scores.device.type == "cpu" and not scores.requires_grad \
            and kernels.quant_kernels_available():
        torch.ops.pagedllm_quant.causal_softmax_(scores, kernels.best_isa_id())
        return scores
    future = torch.full((rows, rows), float("-inf"), dtype=scores.dtype, device=scores.device).triu_(1)
    scores[..., cols - rows:].add_(future)
    return scores.softmax(-1)


# Query rows per chunk of the bfloat16 causal path (64-256 measured alike; all 512 at once 1.5x slower).
_CAUSAL_CHUNK = 128


def _causal_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                              dtype: torch.dtype) -> torch.Tensor:
    """Causal attention from position 0 — q [seqs, heads, len, dim], k and v [seqs, kv_heads, len, dim] —
    with both products in `dtype` GEMMs; the softmax reads the `dtype` scores and sums in float32
    (_causal_softmax), so the scores are never widened in memory. A chunk of
    queries reads only the keys up to its last row, and the queries of a key/value head's group are
    stacked into one matrix, so the keys are not copied once per query head. Returns [seqs, heads,
    len, dim] in `dtype`."""
    seqs, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    q = (q * scale).to(dtype).unflatten(1, (kv_heads, group))  # [seqs, kv_heads, group, len, dim]
    k, v = k.to(dtype).flatten(0, 1), v.to(dtype).flatten(0, 1)  # [seqs · kv_heads, len, dim]
    out = q.new_empty(seqs * kv_heads, group, length, dim)
    for start in range(0, length, _CAUSAL_CHUNK):
        end = min(length, start + _CAUSAL_CHUNK)
        rows = end - start
        scores = torch.bmm(q[..., start:end, :].reshape(-1, group * rows, dim), k[:, :end].transpose(1, 2))
        weights = _causal_softmax(scores.view(-1, rows, end))
        out[:, :, start:end] = torch.bmm(weights.view(-1, group * rows, end), v[:, :end]).view(-1, group, rows, dim)
    return out.view(seqs, heads, length, dim)
