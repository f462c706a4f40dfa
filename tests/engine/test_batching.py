"""64 mixed prompts batched give the same greedy tokens as each prompt alone, whatever the
batch shape: chunked prefill on or off, prefix caching on or off, and under preemption."""

from __future__ import annotations

import random

import pytest

from pagedllm import LLM, SamplingParams
from helpers import assert_same_or_near_tie
from helpers import FLOAT

SYSTEM = "You are a helpful assistant who answers questions about science, history and code. "
TOPICS = ["the moon", "photosynthesis", "the Roman empire", "binary search", "volcanoes", "the printing press",
          "black holes", "recursion", "the French revolution", "DNA", "hash tables", "the water cycle",
          "gravity", "Shakespeare", "sorting algorithms", "electricity"]
TEMPLATES = ["Explain {t} to a child.", "Write two facts about {t}.", "{t} is", "Question: what is {t}? Answer:"]
MAX_TOKENS = 10


def _prompts() -> list[str]:
    rng = random.Random(0)
    prompts = []
    for i in range(64):
        text = TEMPLATES[i % 4].format(t=TOPICS[i % 16])
        if i % 3 == 0:
            text = SYSTEM + text  # a shared prefix across a third of the prompts
        if i % 8 == 5:
            text = text + " " + " ".join(rng.choice(TOPICS) for _ in range(30))  # long ones get chunked
        prompts.append(text)
    return prompts


PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference():
    """Each prompt alone, one at a time, no prefix caching."""
    llm = LLM(kv_cache_memory=16 * 2**20, enable_prefix_caching=False, quantization=FLOAT)
    return llm, [llm.generate(p, PARAMS)[0].token_ids for p in _prompts()]


def _assert_same_or_near_tie(reference, outputs):
    llm, expected = reference
    assert_same_or_near_tie(llm, _prompts(), expected, [o.token_ids for o in outputs])


@pytest.mark.parametrize("name,kwargs", [
    ("chunked", dict(max_num_batched_tokens=96)),
    ("unchunked", dict(max_num_batched_tokens=2048, enable_chunked_prefill=False)),
    ("no-prefix-cache", dict(max_num_batched_tokens=96, enable_prefix_caching=False)),
])
def test_batched_equals_alone(reference, name, kwargs):
    llm = LLM(kv_cache_memory=64 * 2**20, quantization=FLOAT, **kwargs)
    outputs = llm.generate(_prompts(), PARAMS)
    _assert_same_or_near_tie(reference, outputs)
    assert llm.engine.stats().kv_blocks_free == llm.engine.kv_spec.num_blocks
    if kwargs.get("enable_prefix_caching", True):
        assert llm.engine.kv_cache.stats.hit_tokens > 0


def test_preemption_under_memory_pressure(reference):
    # 40 blocks of 16 tokens: far less than 64 prompts need at once.
    llm = LLM(kv_cache_memory=40 * 16 * 46080, max_num_batched_tokens=256, quantization=FLOAT)
    outputs = llm.generate(_prompts(), PARAMS)
    assert llm.engine.scheduler.num_preemptions > 0
    _assert_same_or_near_tie(reference, outputs)
    assert llm.engine.stats().kv_blocks_free == llm.engine.kv_spec.num_blocks
