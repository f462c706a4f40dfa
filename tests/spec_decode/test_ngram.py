"""N-gram speculation: the proposer's rule, and greedy output identical to decoding without it."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.config import SpeculativeConfig
from pagedllm.errors import ConfigError
from pagedllm.spec_decode.ngram import NgramProposer
from helpers import assert_same_or_near_tie
from helpers import FLOAT


def test_proposer_continues_the_latest_longest_match():
    proposer = NgramProposer(num_tokens=3, max_ngram=3, min_ngram=1)
    assert proposer.propose([1, 2, 3, 4, 5, 1, 2], limit=5) == [3, 4, 5]
    assert proposer.propose([1, 2, 9, 1, 2, 7, 1, 2], limit=5) == [7, 1, 2]  # the latest match wins
    assert proposer.propose([4, 1, 2, 3, 8, 2, 3], limit=5) == [8, 2, 3]  # the longest suffix first
    assert proposer.propose([1, 2, 3, 4, 1, 2], limit=1) == [3]
    assert proposer.propose([1, 2, 3], limit=5) == [] and proposer.propose([5], limit=5) == []


def test_bad_config_is_refused():
    with pytest.raises(ConfigError, match="num_speculative_tokens"):
        SpeculativeConfig(num_speculative_tokens=0)
    with pytest.raises(ConfigError, match="method"):
        SpeculativeConfig(method="medusa")


CODE = """def area(width, height):
    return width * height

def perimeter(width, height):
    return 2 * (width + height)
"""
COPY_TASKS = ["Repeat exactly: {x}", "Rename width to w in this code and print the whole code:\n{x}",
              "Add a docstring to each function:\n{x}", "Copy this text twice: {x}"]
TEXTS = [CODE, "red green blue, red green blue, red green blue", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
         "The quick brown fox jumps over the lazy dog. The quick brown fox"]
OTHER = ["The history of Rome", "Water boils at", "Once upon a time", "def add(a, b):", "List three colours:"]


def prompts() -> list[str]:
    copy = [task.format(x=text) for task in COPY_TASKS for text in TEXTS]  # 16
    return (copy * 3 + OTHER)[:45] + OTHER  # 50, some repeated (prefix cache hits with drafts)


def test_speculative_greedy_equals_plain_greedy_on_50_prompts():
    items = prompts()
    params = [SamplingParams(max_tokens=24 if i % 3 else 9, temperature=0, ignore_eos=bool(i % 2)) for i in range(50)]
    plain = LLM(kv_cache_memory=128 * 2**20, max_num_batched_tokens=256, quantization=FLOAT)
    expected = [o.token_ids for o in plain.generate(items, params)]
    spec = LLM(kv_cache_memory=128 * 2**20, max_num_batched_tokens=256, quantization=FLOAT,
               speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    got = [o.token_ids for o in spec.generate(items, params)]
    assert_same_or_near_tie(plain, items, expected, got)
    assert all(len(g) <= p.max_tokens for g, p in zip(got, params))
    stats = spec.engine.stats()
    assert stats.spec_draft_tokens > 0 and 0 < stats.spec_acceptance_rate <= 1
    assert stats.kv_blocks_free == stats.kv_blocks_total
