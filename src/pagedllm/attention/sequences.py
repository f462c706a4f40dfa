"""Attention over whole sequences with no KV cache: the training backend.

A training step feeds complete sequences from position 0 and needs gradients through q, k and v, so
this backend attends each layer's own K/V directly instead of writing them to a paged pool and reading
them back. The sequences of a step are one group in the padded [sequences × longest] layout; the causal
mask keeps every real query on real keys (padding only ever follows a sequence's last token), so no
padding mask is needed. Not a serving backend: `select_backend` does not offer it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .backend import AttentionBackend, _explicit_scores_attention, window_mask
from .metadata import AttentionMetadata, LayerAttention, StepLayout


class SequenceBackend(AttentionBackend):
    name = "sequences"

    def metadata(self, lengths: list[int], device: torch.device | str) -> AttentionMetadata:
        """The step's layout for sequences of `lengths` tokens, concatenated in the flat batch."""
        counts = np.asarray(lengths, dtype=np.int64)
        # One dummy block per sequence, as long as the longest: the layout's block tables are never read.
        layout = StepLayout(np.zeros_like(counts), counts, np.zeros((len(counts), 1), dtype=np.int64),
                            int(counts.max()), device)
        return AttentionMetadata(torch.empty(0, dtype=torch.long), [layout.group(np.arange(len(counts)))], self)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor | None,
                meta: AttentionMetadata, layer: LayerAttention, matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
        (group,) = meta.groups
        index = (group.token_seq, group.token_index)

        def padded(t: torch.Tensor) -> torch.Tensor:  # [tokens, heads, dim] → [seqs, heads, longest, dim]
            empty = t.new_zeros(group.num_seqs, group.max_query_len, *t.shape[1:])
            return empty.index_put(index, t).transpose(1, 2)

        queries, keys, values = padded(q), padded(k), padded(v)
        window = layer.sliding_window
        mask = None if window is None or group.max_query_len <= window else window_mask(
            group.positions_padded, group.max_query_len, window)
        if layer.softcap is not None or layer.alibi is not None:
            mask = mask if mask is not None else window_mask(group.positions_padded, group.max_query_len, None)
            out = _explicit_scores_attention(queries, keys, values, mask, layer, group.positions_padded)
        else:
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=layer.scale,
                                                 is_causal=mask is None, enable_gqa=True)
        return out.transpose(1, 2)[index]

    def attend(self, q, kv_cache, meta, layer, matmul_dtype=None):
        raise TypeError("the sequences backend attends its own K/V (forward), never a cache")
