"""Prefix caching for hybrid models: recurrent states saved at block boundaries.

A cached prefix of K/V blocks is only usable by a hybrid model together with its recurrent layers' state
at the prefix's end, and a state cannot be rebuilt from K/V. So a sequence's state is saved (copied into a
snapshot slot) when it has just computed a snapshot point: every `interval`-th block boundary of its
tokens, the last block boundary of its prompt that a request with the same prompt can resume from (prompts
of an interval or more), and,
while it decodes, each block boundary it passes (one rolling snapshot a sequence, each replacing its last:
the next turn of a chat resumes within a block of where this one ended). A new request's prefix hit is
cut back to the longest run of blocks whose end has a saved state; the snapshot is copied into its slot.

Prefill chunks are cut to end at the snapshot points inside them (the chunked delta rule leaves only the
state at a chunk's end). Snapshots are keyed by the chained hash of the block they follow — the same key
as the block itself, so the same tokens (and adapter) give the same state — and the least recently used
is overwritten when every snapshot slot holds one.
"""

from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence


class StateSnapshots:
    def __init__(self, slots: range, block_size: int, interval: int):
        """`slots`: the state slots that hold snapshots; `interval`: blocks between snapshot points."""
        self.block_size, self.interval = block_size, interval
        self._free = list(reversed(slots))
        self._saved: OrderedDict[int, int] = OrderedDict()  # block hash → slot, least recently used first
        self._rolling: dict[str, int] = {}  # sequence → the hash of its latest decode-time snapshot

    def __len__(self) -> int:
        return len(self._saved)

    def prompt_point(self, sequence: Sequence) -> int:
        """The last block boundary of the prompt that leaves a token to compute (where a request with the
        same prompt resumes)."""
        return (len(sequence.prompt_token_ids) - 1) // self.block_size * self.block_size

    def _prompt_snapshot(self, sequence: Sequence) -> int | None:
        """The prompt's own snapshot point, for prompts of an interval or more (a shorter one costs less to
        compute again than the extra prefill chunk its snapshot would)."""
        point = self.prompt_point(sequence)
        return point if point >= self.interval * self.block_size else None

    def chunk_end(self, sequence: Sequence, start: int, num_new: int) -> int:
        """`num_new` tokens from `start`, cut to end at the first snapshot point after `start`."""
        step = self.interval * self.block_size
        points = [(start // step + 1) * step]
        prompt = self._prompt_snapshot(sequence)
        if prompt is not None and prompt > start:
            points.append(prompt)
        return min(num_new, min(points) - start)

    def resume(self, hashes: list[int]) -> tuple[int, int | None]:
        """The longest run of these chained block hashes whose last block has a saved state: (its length in
        blocks, the snapshot's slot), or (0, None)."""
        for length in range(len(hashes), 0, -1):
            slot = self._saved.get(hashes[length - 1])
            if slot is not None:
                self._saved.move_to_end(hashes[length - 1])
                return length, slot
        return 0, None

    def save(self, sequence: Sequence, computed: int, block_hash: int, source: int) -> tuple[int, int] | None:
        """`sequence` (its state in slot `source`) has computed `computed` tokens, a block boundary whose
        block hashes to `block_hash`: the (source, snapshot) copy to make where this is a snapshot point."""
        decoding = computed > self.prompt_point(sequence)
        if not decoding and computed % (self.interval * self.block_size) and computed != self._prompt_snapshot(sequence):
            return None
        if block_hash in self._saved:
            self._saved.move_to_end(block_hash)
            return None
        if decoding:
            self._drop_rolling(sequence.seq_id)
            self._rolling[sequence.seq_id] = block_hash
        slot = self._take_slot()
        if slot is None:
            return None
        self._saved[block_hash] = slot
        return source, slot

    def forget(self, sequence: Sequence) -> None:
        """The sequence is done: its rolling snapshot stays, as any other, until it is least recently used."""
        self._rolling.pop(sequence.seq_id, None)

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        if not self._saved:
            return None
        _, slot = self._saved.popitem(last=False)
        return slot

    def _drop_rolling(self, seq_id: str) -> None:
        block_hash = self._rolling.pop(seq_id, None)
        if block_hash is not None and block_hash in self._saved:
            self._free.append(self._saved.pop(block_hash))
