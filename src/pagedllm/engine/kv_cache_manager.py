"""KVCacheManager: the only door between the scheduler and the block pool."""

from __future__ import annotations

from .block_pool import BlockPool
from .request import Request


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._blocks: dict[str, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def allocate_slots(self, request: Request, num_new_tokens: int) -> list[int] | None:
        """Make room for `num_new_tokens` more tokens of `request`; None if the pool is short."""
        blocks = self._blocks.setdefault(request.request_id, [])
        total = request.num_computed_tokens + num_new_tokens
        new = self.pool.allocate(max(0, blocks_needed(total, self.block_size) - len(blocks)))
        if new is None:
            return None
        blocks.extend(new)
        return new

    def block_table(self, request: Request) -> list[int]:
        return self._blocks.get(request.request_id, [])

    def free(self, request: Request) -> None:
        self.pool.free(self._blocks.pop(request.request_id, []))
