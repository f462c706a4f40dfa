"""Block manager: allocation, chained hashing, sharing, eviction order and freeing, with exact ids."""

from __future__ import annotations

import pytest

from pagedllm.engine import kv_cache_manager as kvm
from pagedllm.engine.kv_cache_manager import KVCacheManager
from pagedllm.engine.sequence import Sequence
from pagedllm.sampling_params import SamplingParams

BS = 4


def _request(rid: str, ids: list[int]) -> Sequence:
    return Sequence(rid, list(ids), SamplingParams())


def _admit(kv: KVCacheManager, request: Sequence) -> list[int] | None:
    """What the scheduler does: look up the cached prefix, then allocate the rest."""
    cached, num_cached = kv.get_computed_blocks(request)
    new = kv.allocate_slots(request, request.num_tokens - num_cached, cached)
    if new is not None:
        request.num_computed_tokens = request.num_tokens
    return new


def _pool_is_whole(kv: KVCacheManager) -> bool:
    return kv.num_free_blocks == kv.num_blocks and all(b.ref_count == 0 for b in kv.pool.blocks)


def test_shared_prefix_is_computed_once():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    system = list(range(100, 108))  # two full blocks
    a, b = _request("a", system + [1, 2, 3]), _request("b", system + [7, 8])
    assert _admit(kv, a) == [0, 1, 2]
    cached, num_cached = kv.get_computed_blocks(b)
    assert [blk.block_id for blk in cached] == [0, 1] and num_cached == 8
    assert kv.allocate_slots(b, b.num_tokens - num_cached, cached) == [3]
    assert kv.block_table(b) == [0, 1, 3]
    assert [kv.pool.blocks[i].ref_count for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    kv.free(a)
    kv.free(b)
    assert _pool_is_whole(kv)


def test_a_fully_cached_prompt_still_computes_its_last_block():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    prompt = list(range(8))  # exactly two blocks
    _admit(kv, _request("a", prompt))
    cached, num_cached = kv.get_computed_blocks(_request("b", prompt))
    assert num_cached == 4 and [blk.block_id for blk in cached] == [0]


def test_freed_blocks_stay_reusable_until_evicted():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = _request("a", list(range(9)))
    assert _admit(kv, a) == [0, 1, 2]
    kv.free(a)
    again = _request("again", list(range(9)))
    cached, num_cached = kv.get_computed_blocks(again)
    assert [blk.block_id for blk in cached] == [0, 1] and num_cached == 8
    kv.allocate_slots(again, 1, cached)
    assert kv.block_table(again) == [0, 1, 3]  # block 2 (a's unfinished tail) was the first to go
    kv.free(again)
    # a request with other tokens needs every block: all cached ones are evicted, LRU first
    other = _request("other", list(range(50, 66)))
    assert _admit(kv, other) == [2, 3, 1, 0]
    assert kv.get_computed_blocks(_request("late", list(range(9)))) == ([], 0)


def test_cached_free_blocks_are_not_counted_twice():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = _request("a", list(range(9)))
    _admit(kv, a)
    kv.free(a)
    # b hits blocks 0 and 1 (both free) and needs 2 more: only 1 other block is free
    b = _request("b", list(range(8)) + [90, 91, 92, 93, 94])
    cached, num_cached = kv.get_computed_blocks(b)
    assert kv.allocate_slots(b, b.num_tokens - num_cached, cached) is None
    assert _pool_is_whole(kv)


def test_hash_collisions_are_ruled_out_by_comparing_tokens(monkeypatch):
    monkeypatch.setattr(kvm, "chain_hash", lambda parent, tokens: 42)
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    _admit(kv, _request("a", [1, 2, 3, 4, 5]))
    assert kv.get_computed_blocks(_request("b", [9, 9, 9, 9, 5])) == ([], 0)


def test_disabled_prefix_caching_never_hits():
    kv = KVCacheManager(num_blocks=6, block_size=BS, enable_prefix_caching=False)
    _admit(kv, _request("a", list(range(9))))
    assert kv.get_computed_blocks(_request("b", list(range(9)))) == ([], 0)


def test_hit_rate_counts_tokens():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    _admit(kv, _request("a", list(range(9))))
    _admit(kv, _request("b", list(range(9))))
    assert kv.stats.queried_tokens == 18 and kv.stats.hit_tokens == 8
    assert kv.stats.hit_rate == pytest.approx(8 / 18)


def test_token_ids_at_reads_across_prompt_output_and_drafts():
    request = Sequence("r", [1, 2, 3], SamplingParams())
    request.output_token_ids += [4, 5]
    request.spec_token_ids = [6, 7]
    joined = [1, 2, 3, 4, 5, 6, 7]
    for start in range(len(joined) + 1):
        for count in range(len(joined) - start + 1):
            assert request.token_ids_at(start, count) == joined[start:start + count]
