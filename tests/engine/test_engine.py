"""The engine on the default model: batching does not change greedy results; blocks come back."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.engine.llm_engine import RequestError
from pagedllm.engine.sequence import Sequence
from pagedllm.engine.kv_cache_manager import KVCacheManager
from helpers import FLOAT

PROMPTS = ["The history of Rome", "def add(a, b):", "Water boils at", "List three colours:", "Once upon a time",
           "The mitochondria is"]


@pytest.fixture(scope="module")
def llm():
    # The float path: with packed weights a row's products depend slightly on how many rows share
    # the step (kernel tiles), and the default model has near-ties (0.08 apart) that such noise flips.
    return LLM(kv_cache_memory=32 * 2**20, max_num_batched_tokens=64, quantization=FLOAT)


def test_batched_equals_alone(llm):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    together = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, together):
        assert llm.generate(prompt, params)[0].token_ids == out.token_ids
    stats = llm.engine.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total and stats.num_running == stats.num_waiting == 0


def test_preemption_keeps_greedy_outputs():
    small = LLM(kv_cache_memory=45 * 1024 * 16 * 6, max_num_batched_tokens=64, quantization=FLOAT)  # six 16-token blocks
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    prompts = PROMPTS[:3]
    outs = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        assert small.generate(prompt, params)[0].token_ids == out.token_ids
    assert small.engine.stats().kv_blocks_free == small.engine.kv_spec.num_blocks


def test_streamed_deltas_add_up_to_the_text(llm):
    engine = llm.engine
    engine.add_request("s", "Write a haiku about the sea.", SamplingParams(max_tokens=24, temperature=0))
    deltas, final = [], None
    while engine.has_unfinished():
        for out in engine.step():
            deltas.append(out.delta_text)
            final = out
    assert final.finished and "".join(deltas) == final.text


def test_abort_frees_blocks(llm):
    engine = llm.engine
    engine.add_request("a", "Tell me a long story", SamplingParams(max_tokens=200, temperature=0))
    engine.step()
    engine.abort("a")
    assert not engine.has_unfinished()
    assert engine.stats().kv_blocks_free == engine.kv_spec.num_blocks


@pytest.mark.parametrize("prompt,params,match", [
    ("", SamplingParams(), "empty"),
    ([10**9], SamplingParams(), "token ids"),
    ("hi", SamplingParams(max_tokens=10**6), "exceed the whole KV cache"),
    (3.5, SamplingParams(), "a prompt is"),
])
def test_refused_at_admission(llm, prompt, params, match):
    with pytest.raises(RequestError, match=match):
        llm.engine.add_request("bad", prompt, params)
    assert not llm.engine.has_unfinished()


def test_kv_cache_manager_allocates_and_frees_exact_blocks():
    from pagedllm.sampling_params import SamplingParams as SP

    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    a, b = Sequence("a", [1] * 6, SP()), Sequence("b", [1] * 9, SP())
    assert kv.allocate_slots(a, 6) == [0, 1]
    assert kv.allocate_slots(b, 9) is None  # needs 3, only 2 left
    a.num_computed_tokens = 6
    assert kv.allocate_slots(a, 2) == []  # still fits in block 1
    assert kv.allocate_slots(a, 3) == [2]
    kv.free(a)  # tail first: block 2 is the first of a's blocks to be evicted
    assert kv.num_free_blocks == 4
    assert kv.allocate_slots(b, 9) == [3, 2, 1]


def test_prefix_caching_reuses_a_shared_system_prompt_without_changing_outputs():
    # The float path: packed weights take another kernel when a cache hit shortens the prompt.
    llm = LLM(kv_cache_memory=32 * 2**20, max_num_batched_tokens=64, quantization=FLOAT)
    system = ("You are a careful assistant. Answer in one short sentence, without lists, and say so "
              "plainly when you do not know the answer. ")
    questions = ["What is rain?", "Why is the sky blue?", "What is a prime number?", "Who wrote Hamlet?"]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    cached = llm.generate([system + q for q in questions], params)
    assert llm.engine.kv_cache.stats.hit_tokens >= 3 * 16  # later requests found the system prompt's blocks
    assert llm.engine.stats().prefix_cache_hit_rate > 0
    uncached = LLM(kv_cache_memory=32 * 2**20, max_num_batched_tokens=64, enable_prefix_caching=False,
                   quantization=FLOAT)
    assert [o.token_ids for o in uncached.generate([system + q for q in questions], params)] == \
        [o.token_ids for o in cached]
    assert uncached.engine.kv_cache.stats.hit_tokens == 0
    stats = llm.engine.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_stats_count_tokens_and_rates():
    llm = LLM(kv_cache_memory=16 * 2**20, enable_prefix_caching=False)
    prompts = ["Count to ten:", "Name a fruit:"]
    llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    stats = llm.engine.stats()
    tokenizer = llm.get_tokenizer()
    assert stats.prompt_tokens_total == sum(len(tokenizer.encode(p)) for p in prompts)
    assert stats.generation_tokens_total == 16
    assert stats.generation_tok_s > 0


@pytest.mark.parametrize("kv_dtype,pool_dtype,gain", [("float16", torch.float16, 2), ("bfloat16", torch.bfloat16, 2),
                                                      ("q8_0", torch.uint8, 3.7)])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_a_smaller_kv_cache_holds_more_tokens_and_keeps_the_answer(kv_dtype, pool_dtype, gain, backend):
    prompt, params = "The capital of France is", SamplingParams(max_tokens=6, temperature=0)
    full = LLM(kv_cache_memory=4 * 2**20, attention_backend=backend, kv_cache_dtype="float32")
    small = LLM(kv_cache_memory=4 * 2**20, attention_backend=backend, kv_cache_dtype=kv_dtype)
    assert small.engine.runner.kv_pool.dtype == pool_dtype
    assert small.engine.kv_spec.num_blocks >= gain * full.engine.kv_spec.num_blocks
    want, have = (llm.generate(prompt, params)[0] for llm in (full, small))
    assert "Paris" in have.text
    assert have.token_ids[:4] == want.token_ids[:4]  # later a near-tie may go either way (rounding)


def test_an_unknown_kv_cache_dtype_is_refused():
    with pytest.raises(ValueError, match="kv cache dtype must be one of"):
        LLM(kv_cache_dtype="q4")


def test_rooms_import_only_what_the_map_allows():
    """The engine does not import the speculative proposers (they import the engine's interfaces),
    and SamplingParams does not pull in tokenizers, model loaders or the sampler."""
    import ast
    import subprocess
    import sys

    def rooms_after_importing(module: str) -> set[str]:
        script = (f"import sys, {module}\n"
                  "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('pagedllm.')}))")
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
        return set(ast.literal_eval(out))

    assert "spec_decode" not in rooms_after_importing("pagedllm.engine.llm_engine")
    assert rooms_after_importing("pagedllm.sampling_params") == {"errors", "sampling_params"}
