"""The pool of KV blocks: ids only; the tensors live in the ModelRunner."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Hands out block ids from a free queue and takes them back.

    Invariant: every block id is either in the free queue or owned by exactly one holder.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int] | None:
        if count > len(self._free):
            return None
        return [self._free.popleft() for _ in range(count)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)
