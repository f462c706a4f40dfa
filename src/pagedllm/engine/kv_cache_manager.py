"""KVCacheManager: the only door between the scheduler and the block pool (and, for hybrid models, the
slots of the recurrent layers' per-sequence states)."""

from __future__ import annotations

from dataclasses import dataclass

from .block_pool import BlockPool, KVBlock, chain_hash
from .sequence import Sequence
from .state_snapshots import StateSnapshots


def _root_hash(sequence: Sequence) -> int | None:
    """What a sequence's first block chains from: under a LoRA adapter the same tokens hold other K/V."""
    return hash(("lora", sequence.lora_id)) if sequence.lora_id else None


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None, num_state_slots: int = 0, num_snapshot_slots: int = 0,
                 snapshot_interval: int = 16, state_checkpoints: bool = False):
        """`sliding_window`: the window every layer of the model keeps to; the blocks behind it go back to the
        pool as a sequence moves on (None: a sequence keeps all of its blocks). `num_state_slots`: hybrid
        models' recurrent-state slots; each running sequence holds one (0: the model has no such layers).
        `num_snapshot_slots`: the slots after those that hold saved states, the hybrid's prefix cache
        (state_snapshots.py: one every `snapshot_interval` blocks); without any, no prefix is reused.
        `state_checkpoints`: a second slot a running one, after the snapshots (speculative decoding: a state
        before a step's drafts, to roll back to when some are rejected)."""
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.stats = PrefixCacheStats()
        # Each sequence's blocks by position; None where a block fell behind the window and was freed.
        self._blocks: dict[str, list[KVBlock | None]] = {}
        self._hashes: dict[str, list[int]] = {}  # chained hashes of each sequence's full blocks
        self._pending_copies: list[tuple[int, int]] = []  # (source, destination) block ids, copy on write
        self.uses_states = num_state_slots > 0
        self._free_states = list(range(num_state_slots - 1, -1, -1))  # popped from the end: slot 0 first
        self._state_slots: dict[str, int] = {}
        self._pending_state_copies: list[tuple[int, int]] = []  # (source, destination) slots: forks, snapshots
        self.snapshots = StateSnapshots(range(num_state_slots, num_state_slots + num_snapshot_slots), block_size,
                                        snapshot_interval) if num_snapshot_slots and enable_prefix_caching else None
        self._resume_from: dict[str, int] = {}  # sequence → the snapshot slot its state starts from
        self._checkpoint_offset = num_state_slots + num_snapshot_slots if state_checkpoints else None
        if self.uses_states and self.snapshots is None:
            self.pool.enable_caching = False  # a hybrid's cached K/V is of no use without its states

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def get_computed_blocks(self, sequence: Sequence) -> tuple[list[KVBlock], int]:
        """The longest cached prefix of a new sequence, in whole blocks, leaving at least one
        token to compute (the step must produce logits, and must not write a shared block)."""
        if not self.pool.enable_caching or sequence.needs_every_prompt_row:
            return [], 0  # prompt logprobs and pooling read every prompt position: nothing can be skipped
        hits: list[KVBlock] = []
        parent, ids = _root_hash(sequence), sequence.all_token_ids
        for index in range((len(ids) - 1) // self.block_size):
            tokens = self._block_tokens(ids, index)
            parent = chain_hash(parent, tokens)
            block = self.pool.lookup(parent, tokens)
            if block is None:
                break
            hits.append(block)
        if self.snapshots is not None:  # a hybrid resumes only where a state was saved
            length, slot = self.snapshots.resume([b.block_hash for b in hits])
            hits = hits[:length]
            if slot is not None:
                self._resume_from[sequence.seq_id] = slot
        self.stats.queried_tokens += sequence.num_tokens
        self.stats.hit_tokens += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(self, sequence: Sequence, num_new_tokens: int,
                       computed_blocks: list[KVBlock] | None = None) -> list[int] | None:
        """Make room for `num_new_tokens` more tokens of `sequence` (after any cached prefix
        `computed_blocks`); returns the new block ids, or None if the pool is short."""
        blocks = self._blocks.setdefault(sequence.seq_id, [])
        computed_blocks = computed_blocks or []
        self._free_behind_window(sequence, blocks)
        total = sequence.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        needed = blocks_needed(total, self.block_size) - len(blocks) - len(computed_blocks)
        shared_tail = self._shared_partial_tail(sequence, blocks)
        # Cached blocks sitting in the free queue are not free for this sequence's new blocks.
        reusable = sum(1 for b in computed_blocks if b.ref_count == 0)
        if needed + shared_tail > self.pool.num_free_blocks - reusable:
            return None
        if self.uses_states and not self._take_state_slot(sequence, computed_blocks):
            return None
        if shared_tail:
            self._copy_on_write(blocks)
        self.pool.touch(computed_blocks)
        new = self.pool.allocate(max(0, needed)) or []
        blocks.extend(computed_blocks + new)
        self._cache_full_blocks(sequence, min(total, sequence.num_tokens))  # drafts are not cached until accepted
        return [b.block_id for b in new]

    def chunk_end(self, sequence: Sequence, start: int, num_new: int) -> int:
        """`num_new` tokens of `sequence` from `start`, cut where a hybrid's prefill chunk must end for its
        state to be saved (StateSnapshots.chunk_end)."""
        return num_new if self.snapshots is None else self.snapshots.chunk_end(sequence, start, num_new)

    def _take_state_slot(self, sequence: Sequence, computed_blocks: list[KVBlock]) -> bool:
        """A hybrid sequence's state slot: kept, or taken (a prefix hit's saved state copied in); where it
        has just computed a block boundary, its state saved there if that is a snapshot point."""
        slot = self._state_slots.get(sequence.seq_id)
        if slot is None:
            if not self._free_states:
                return False
            slot = self._state_slots[sequence.seq_id] = self._free_states.pop()
            resume = self._resume_from.pop(sequence.seq_id, None)
            if computed_blocks and resume is not None:
                self._pending_state_copies.append((resume, slot))
        self._save_state(sequence, slot)
        return True

    def _save_state(self, sequence: Sequence, slot: int) -> None:
        """Where `sequence` has just computed a block boundary that is a snapshot point, its state (in `slot`)
        is saved there."""
        computed = sequence.num_computed_tokens
        hashes = self._hashes.get(sequence.seq_id, [])
        if self.snapshots is not None and computed and computed % self.block_size == 0 \
                and len(hashes) >= computed // self.block_size:
            copy = self.snapshots.save(sequence, computed, hashes[computed // self.block_size - 1], slot)
            if copy is not None:
                self._pending_state_copies.append(copy)

    def _free_behind_window(self, sequence: Sequence, blocks: list[KVBlock | None]) -> None:
        """Free the blocks no query of this sequence will read again: every query from here on sits at a
        position ≥ num_computed_tokens and sees only the `sliding_window` keys up to itself."""
        if self.sliding_window is None:
            return
        dead = max(0, sequence.num_computed_tokens + 1 - self.sliding_window) // self.block_size
        first = dead  # the freed ones lead the list: walk back only over those newly behind
        while first > 0 and blocks[first - 1] is not None:
            first -= 1
        if first < dead:
            self.pool.free(blocks[first:dead])
            blocks[first:dead] = [None] * (dead - first)

    def _shared_partial_tail(self, sequence: Sequence, blocks: list[KVBlock]) -> bool:
        """The next token lands in a partly filled block that a fork shares with this sequence."""
        return bool(blocks) and sequence.num_computed_tokens % self.block_size != 0 and blocks[-1].ref_count > 1

    def _copy_on_write(self, blocks: list[KVBlock]) -> None:
        shared = blocks[-1]
        (copy,) = self.pool.allocate(1)
        self.pool.free([shared])
        blocks[-1] = copy
        self._pending_copies.append((shared.block_id, copy.block_id))

    def fork(self, parent: Sequence, child: Sequence) -> bool:
        """`child` continues from `parent`'s cached tokens: it shares every block (the partly
        filled last one is copied when either of them writes to it) and gets a copy of its recurrent
        states. False, and nothing shared, where no state slot is free: the child must start over."""
        if self.uses_states:
            if not self._free_states:
                return False
            self._state_slots[child.seq_id] = self._free_states.pop()
            self._pending_state_copies.append((self._state_slots[parent.seq_id], self._state_slots[child.seq_id]))
        blocks = list(self._blocks.get(parent.seq_id, []))
        self.pool.touch([b for b in blocks if b is not None])
        self._blocks[child.seq_id] = blocks
        self._hashes[child.seq_id] = list(self._hashes.get(parent.seq_id, []))
        return True

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """Block copies the model runner must make before the next forward pass."""
        copies, self._pending_copies = self._pending_copies, []
        return copies

    def take_pending_state_copies(self) -> list[tuple[int, int]]:
        """State-slot copies (forks) the model runner must make before the next forward pass."""
        copies, self._pending_state_copies = self._pending_state_copies, []
        return copies

    def checkpoint_state(self, sequence: Sequence) -> None:
        """A hybrid sequence about to verify drafts: its state copied aside before the step (roll_back_state)."""
        if self._checkpoint_offset is None:
            raise RuntimeError("the cache keeps no state checkpoints: speculative decoding on a hybrid needs them")
        slot = self._state_slots[sequence.seq_id]
        self._pending_state_copies.append((slot, slot + self._checkpoint_offset))

    def roll_back_state(self, sequence: Sequence) -> None:
        """Some of the step's drafts were rejected: the state goes back to before the step (the tokens kept
        are computed again from there next step; the K/V they wrote is written again, the same)."""
        slot = self._state_slots[sequence.seq_id]
        self._pending_state_copies.append((slot + self._checkpoint_offset, slot))

    def state_slot(self, sequence: Sequence) -> int:
        return self._state_slots[sequence.seq_id]

    def _cache_full_blocks(self, sequence: Sequence, num_tokens: int) -> None:
        blocks, hashes = self._blocks[sequence.seq_id], self._hashes.setdefault(sequence.seq_id, [])
        ids = sequence.all_token_ids
        for index in range(len(hashes), num_tokens // self.block_size):
            tokens = self._block_tokens(ids, index)
            hashes.append(chain_hash(hashes[-1] if hashes else _root_hash(sequence), tokens))
            self.pool.cache(blocks[index], hashes[-1], tokens)

    def _block_tokens(self, ids: list[int], index: int) -> tuple[int, ...]:
        return tuple(ids[index * self.block_size:(index + 1) * self.block_size])

    def block_table(self, sequence: Sequence) -> list[int]:
        """Block ids by position; a block freed behind the window reads as the last one, always held (the
        window keeps attention off those positions, and a held block holds finite values)."""
        blocks = self._blocks.get(sequence.seq_id, [])
        return [(blocks[-1] if b is None else b).block_id for b in blocks]

    def num_held_blocks(self, sequence: Sequence) -> int:
        return sum(b is not None for b in self._blocks.get(sequence.seq_id, []))

    def free(self, sequence: Sequence) -> None:
        self._resume_from.pop(sequence.seq_id, None)
        slot = self._state_slots.pop(sequence.seq_id, None)
        if self.snapshots is not None:  # a sequence ending on a block boundary leaves its state there
            if slot is not None:
                self._save_state(sequence, slot)
            self.snapshots.forget(sequence)
        if slot is not None:
            self._free_states.append(slot)
        self._hashes.pop(sequence.seq_id, None)
        self.pool.free([b for b in reversed(self._blocks.pop(sequence.seq_id, [])) if b is not None])
