"""Per-sequence recurrent state for the layers that are not attention (hybrid models): where each sequence
of a step keeps its state between steps, and a causal convolution that continues from it.

A sequence holds one slot of each such layer's state tensors (engine/kv_cache_manager.py hands the
slots out); a sequence starting at position 0 starts from zeros, whatever its slot held before."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .. import kernels


@dataclass
class StateMetadata:
    """The step's sequences, in batch order, as the recurrent layers see them.

    slots:       [seqs] each sequence's state slot.
    fresh:       [seqs] bool: the sequence starts at position 0 (its state is zeros, not its slot's).
    query_start: [seqs + 1] where each sequence's tokens start in the flat batch.
    counts:      numpy [seqs] new tokens of each sequence (host copy: layers pick their path by it).
    The row indices the layers gather through are built on first use and kept for the step's other layers.
    """

    slots: torch.Tensor
    fresh: torch.Tensor
    query_start: torch.Tensor
    counts: np.ndarray
    _rows: dict = field(default_factory=dict)

    @classmethod
    def build(cls, starts: np.ndarray, counts: np.ndarray, slots: np.ndarray, device) -> "StateMetadata":
        query_start = np.concatenate([[0], np.cumsum(counts)])

        def tensor(values, dtype=torch.long) -> torch.Tensor:
            return torch.as_tensor(np.asarray(values), dtype=dtype, device=device)

        return cls(tensor(slots), tensor(starts == 0, torch.bool), tensor(query_start), np.asarray(counts))

    @functools.cached_property
    def decoding(self) -> bool:
        """Every sequence of the step has one new token (asked by every recurrent layer: worked out once)."""
        return bool((self.counts == 1).all())

    def padded_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[seqs, longest] the flat batch's row of each sequence's i-th new token (0 past its count), and
        [seqs, longest] which of them are real."""
        if "padded" not in self._rows:
            counts = torch.as_tensor(self.counts, device=self.query_start.device)
            index = torch.arange(int(self.counts.max()), device=counts.device)[None]
            valid = index < counts[:, None]
            self._rows["padded"] = (torch.where(valid, self.query_start[:-1, None] + index, 0), valid)
        return self._rows["padded"]

    def conv_rows(self, taps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For a causal convolution of `taps` taps over [history rows; token rows] (each sequence's taps − 1
        remembered inputs, sequence by sequence, then the step's tokens): [tokens, taps] the rows each
        token's output reads, oldest first, and [seqs, taps − 1] the rows that become each sequence's
        history for its next step (its last taps − 1 inputs)."""
        if taps not in self._rows:
            self._rows[taps] = self._build_conv_rows(taps)
        return self._rows[taps]

    def _build_conv_rows(self, taps: int) -> tuple[torch.Tensor, torch.Tensor]:
        counts = torch.as_tensor(self.counts, device=self.query_start.device)
        seqs, keep = len(self.counts), taps - 1
        history = seqs * keep  # token rows follow the history rows

        def row(seq: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
            """The row of a sequence's input at `offset` from its first new token (negative: remembered)."""
            return torch.where(offset >= 0, history + self.query_start[seq] + offset, seq * keep + keep + offset)

        device = counts.device
        token_seq = torch.repeat_interleave(torch.arange(seqs, device=device), counts)
        token_offset = torch.arange(len(token_seq), device=device) - self.query_start[token_seq]
        reads = row(token_seq[:, None], token_offset[:, None] + torch.arange(-keep, 1, device=device)[None])
        tail = row(torch.arange(seqs, device=device)[:, None], counts[:, None] - keep + torch.arange(keep, device=device)[None])
        return reads, tail


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor,
                meta: StateMetadata, silu: bool = False) -> torch.Tensor:
    """Depthwise causal convolution of each sequence's tokens x [tokens, channels] with weight
    [channels, taps], continuing from its remembered inputs (state [slots, taps − 1, channels], updated
    in place to the sequence's last taps − 1 inputs); `silu`: the output through SiLU."""
    if x.device.type == "cpu" and state.dtype == torch.float32 and kernels.quant_kernels_available():
        return kernels.causal_conv(x.float().contiguous(), weight.float().contiguous(),
                                   None if bias is None else bias.float(), state, meta.slots, meta.fresh,
                                   meta.query_start, silu).to(x.dtype)
    taps = weight.shape[1]
    reads, tail = meta.conv_rows(taps)
    history = state[meta.slots].masked_fill(meta.fresh[:, None, None], 0)
    rows = torch.cat([history.reshape(-1, x.shape[1]).to(x.dtype), x])
    # Tap by tap: a batched product per channel would make torch copy thousands of 1-column matrices.
    out = rows[reads[:, 0]] * weight[:, 0]
    for tap in range(1, taps):
        out += rows[reads[:, tap]] * weight[:, tap]
    if bias is not None:
        out = out + bias
    state[meta.slots] = rows[tail].to(state.dtype)
    return F.silu(out) if silu else out
