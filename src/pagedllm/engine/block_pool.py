"""The pool of KV blocks: ids, reference counts and the prefix-cache index (the tensors live in
the ModelRunner)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set once the block is full and registered in the prefix cache
    token_ids: tuple[int, ...] = ()  # the tokens behind the hash, to rule out collisions


def chain_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """A full block is identified by its tokens and everything before it."""
    return hash((parent_hash, token_ids))


class BlockPool:
    """Hands out blocks from a free queue in eviction order (least recently freed first).

    Invariants: a block is in the free queue exactly when its ref_count is 0; a freed block
    keeps its hash, so a later request can pick it up again until it is handed out anew.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.enable_caching = enable_caching
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, KVBlock] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def states(self) -> str:
        """One letter a block, by id: `u` in use, `c` free but holding a cached prefix, `f` free."""
        return "".join("u" if b.ref_count else "c" if b.block_hash is not None else "f" for b in self.blocks)

    def lookup(self, block_hash: int, token_ids: tuple[int, ...]) -> KVBlock | None:
        block = self._cached.get(block_hash)
        return block if block is not None and block.token_ids == token_ids else None

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on cached blocks (a prefix hit), pulling free ones out of the queue."""
        for block in blocks:
            if block.ref_count == 0:
                del self._free[block.block_id]
            block.ref_count += 1

    def allocate(self, count: int) -> list[KVBlock] | None:
        if count > len(self._free):
            return None
        blocks = [self.blocks[self._free.popitem(last=False)[0]] for _ in range(count)]
        for block in blocks:
            self._evict(block)
            block.ref_count = 1
        return blocks

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop one reference each; pass blocks tail first so a sequence's end is evicted first."""
        for block in blocks:
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block.block_id] = None

    def cache(self, block: KVBlock, block_hash: int, token_ids: tuple[int, ...]) -> None:
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash, block.token_ids = block_hash, token_ids
        self._cached.setdefault(block_hash, block)

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None and self._cached.get(block.block_hash) is block:
            del self._cached[block.block_hash]
        block.block_hash, block.token_ids = None, ()
