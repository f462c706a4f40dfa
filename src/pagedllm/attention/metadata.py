"""What a step tells attention: where its tokens sit in the paged cache, grouped so that padding
stays within each group, and what each layer asks of its scores."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from ..layers.recurrent_state import StateMetadata
    from .backend import AttentionBackend


def long_tensor(values, device: torch.device | str) -> torch.Tensor:
    """Step data as int64 on `device`. To a GPU it goes through pinned memory without waiting: the
    copy overlaps the host's next work, and the stream orders it before the kernels that read it."""
    host = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class LayerAttention:
    """One layer's attention: its scale, window, soft-capping and ALiBi slopes, attention sinks, and whether
    its products may run in bfloat16 (the layer's own GEMMs do: packed weights on a CPU that multiplies
    bfloat16 natively), as the CPU kernels then take them."""

    scale: float
    sliding_window: int | None = None
    softcap: float | None = None
    alibi: torch.Tensor | None = None  # [heads] float32 slopes
    bfloat16_products: bool = False
    # Latent attention: the pool holds one row a token, the keys; the values are its first value_dim entries.
    value_dim: int | None = None
    # Attention sinks (gpt-oss): [heads] float32 learned logits, one more term in each head's softmax
    # denominator with no value (the weights of the real keys sum to less than 1).
    sinks: torch.Tensor | None = None


@dataclass
class AttentionGroup:
    """Sequences attended together.

    rows:          [tokens] where the group's tokens sit in the step's flat batch.
    block_tables:  [seqs, max_blocks] blocks of each sequence, padded with 0.
    token_seq:     [tokens] which of the group's sequences each token belongs to.
    token_index:   [tokens] index of the token among its sequence's new tokens.
    query_start:   [seqs + 1] where each sequence's tokens start among the group's tokens.
    positions_padded: [seqs, max_query_len] absolute positions, padded rows at position 0.
    context_lens:  [seqs] tokens of each sequence in the cache once this step is written.
    max_context_len: the longest of them.
    use_decode_kernel: attend with the C++ decode kernel (the cpu backend: one query per sequence).
    use_prefill_kernel: attend with the fused C++ prefill kernel (the cpu backend: several queries).
    from_start:    every sequence's new tokens start at position 0 (no cached prefix), so the plain
                   causal mask is the mask and SDPA can skip the blocks above the diagonal.
    """

    rows: torch.Tensor
    block_tables: torch.Tensor
    token_seq: torch.Tensor
    token_index: torch.Tensor
    query_start: torch.Tensor
    positions_padded: torch.Tensor
    context_lens: torch.Tensor
    max_context_len: int
    use_decode_kernel: bool = False
    use_prefill_kernel: bool = False
    from_start: bool = False

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]

    @property
    def max_query_len(self) -> int:
        return self.positions_padded.shape[1]


@dataclass
class AttentionMetadata:
    """Where one step's flat batch of tokens sits in the paged cache, built by its backend."""

    slot_mapping: torch.Tensor  # [tokens] cache slot (block * block_size + offset) each token writes to
    groups: list[AttentionGroup]
    backend: "AttentionBackend"
    # The backend's own per-step state (the torch backend's masks, one set per window), built on first use.
    cache: dict = field(default_factory=dict)
    # Hybrid models: each sequence's recurrent-state slot (set by the model runner).
    states: "StateMetadata | None" = None
    # [tokens] a multiplier of each token's queries (Ministral 3's long-context temperature), set by the model.
    query_scale: torch.Tensor | None = None


@dataclass(frozen=True)
class StepLayout:
    """A step's sequences as the runner sees them: where each one's new tokens start and how many
    there are, and its block table; backends build their metadata from it."""

    starts: np.ndarray  # [seqs] tokens already in the cache
    counts: np.ndarray  # [seqs] new tokens this step
    table: np.ndarray  # [seqs, max_blocks] block ids, padded with 0
    block_size: int
    device: torch.device | str

    @functools.cached_property
    def query_start(self) -> np.ndarray:
        """[seqs + 1] where each sequence's tokens start in the step's flat batch."""
        return np.concatenate([[0], np.cumsum(self.counts)])

    @functools.cached_property
    def token_seq(self) -> np.ndarray:
        """[tokens] the sequence of each token of the flat batch."""
        return np.repeat(np.arange(len(self.counts)), self.counts)

    @functools.cached_property
    def positions(self) -> np.ndarray:
        """[tokens] each token's position in its sequence."""
        seq = self.token_seq
        return self.starts[seq] + np.arange(len(seq)) - self.query_start[seq]

    def tensor(self, values) -> torch.Tensor:
        return long_tensor(values, self.device)

    def slot_mapping(self) -> torch.Tensor:
        bs, positions = self.block_size, self.positions
        return self.tensor(self.table[self.token_seq, positions // bs] * bs + positions % bs)

    def group(self, seqs: np.ndarray) -> AttentionGroup:
        """The sequences `seqs` as one group, in the padded [seqs, max query length] layout."""
        counts = self.counts[seqs]
        token_seq = np.repeat(np.arange(len(seqs)), counts)
        first = np.concatenate([[0], np.cumsum(counts)])
        token_index = np.arange(int(counts.sum())) - first[token_seq]
        rows = self.query_start[seqs][token_seq] + token_index
        padded = np.zeros((len(seqs), int(counts.max())), dtype=np.int64)
        padded[token_seq, token_index] = self.starts[seqs][token_seq] + token_index
        context_lens = self.starts[seqs] + counts
        blocks = self.table[seqs, :math.ceil(int(context_lens.max()) / self.block_size)]
        t = self.tensor
        return AttentionGroup(rows=t(rows), block_tables=t(blocks), token_seq=t(token_seq), token_index=t(token_index),
                              query_start=t(first), positions_padded=t(padded), context_lens=t(context_lens),
                              max_context_len=int(context_lens.max()), from_start=bool((self.starts[seqs] == 0).all()))

    def decode_and_prefill_groups(self) -> list[AttentionGroup]:
        """Decodes (one new token each) and prefill chunks apart: padding stays within each group."""
        return [self.group(np.flatnonzero(sel)) for sel in (self.counts == 1, self.counts > 1) if sel.any()]
