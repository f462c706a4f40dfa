"""Where a prompt's beginning is likely cached: the chained block hashes of the prompts sent to one core.

The client cannot see a core's prefix cache; it remembers, per core, the hashes of the whole blocks of
the prompts it sent there (chained as the cache chains them: a block's hash covers every token before
it), the most recent last, at most `capacity` of them. A core may have evicted some since, so this is a
guess, as SGLang's router's radix tree is; a wrong guess costs a recompute, never a wrong answer.
"""

from __future__ import annotations

from collections import OrderedDict


def block_hashes(ids: list[int], block_size: int) -> list[int]:
    """One hash per whole block of `ids`, each covering the blocks before it."""
    hashes, previous = [], 0
    for start in range(0, len(ids) - block_size + 1, block_size):
        previous = hash((previous, tuple(ids[start:start + block_size])))
        hashes.append(previous)
    return hashes


class PrefixIndex:
    def __init__(self, capacity: int = 1 << 16):
        self.capacity = capacity
        self._seen: OrderedDict[int, None] = OrderedDict()

    def match(self, hashes: list[int]) -> int:
        """How many of the leading blocks were sent here."""
        count = 0
        for value in hashes:
            if value not in self._seen:
                break
            count += 1
        return count

    def record(self, hashes: list[int]) -> None:
        for value in hashes:
            self._seen[value] = None
            self._seen.move_to_end(value)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
