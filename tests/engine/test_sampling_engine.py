"""Sampling through the engine on the default model: seeds, n / best_of, logprobs, stops, timeouts."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from pagedllm import LLM, SamplingParams
from helpers import prefill_logits
from helpers import FLOAT

PROMPTS = ["The history of Rome", "def add(a, b):", "Water boils at", "List three colours:", "Once upon a time"]


@pytest.fixture(scope="module")
def llm():
    return LLM(kv_cache_memory=64 * 2**20, max_num_batched_tokens=128, quantization=FLOAT)


def test_seeded_request_is_the_same_in_any_batch(llm):
    seeded = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    other = SamplingParams(max_tokens=8, temperature=1.0)
    alone = llm.generate("Tell me a story", seeded)[0].token_ids
    mixed = llm.generate(PROMPTS[:2] + ["Tell me a story"] + PROMPTS[2:], [other] * 2 + [seeded] + [other] * 3)
    reordered = llm.generate(["Tell me a story"] + PROMPTS[::-1], [seeded] + [other] * 5)
    assert mixed[2].token_ids == alone and reordered[0].token_ids == alone


def peak_blocks(llm: LLM, prompts, params) -> tuple[int, list]:
    engine = llm.engine
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"peak-{i}", prompt, p)
    peak, outputs = 0, []
    while engine.has_unfinished():
        outputs += [o for o in engine.step() if o.finished]
        stats = engine.stats()
        peak = max(peak, stats.kv_blocks_total - stats.kv_blocks_free)
    assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total
    return peak, outputs


def test_n_samples_share_the_prompts_blocks():
    llm = LLM(kv_cache_memory=64 * 2**20, enable_prefix_caching=False, quantization=FLOAT)
    prompt = "Write a long poem about the sea, the wind and the ships that sail between them. " * 3
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=3)
    shared, (out,) = peak_blocks(llm, [prompt], [replace(params, n=4)])
    separate, _ = peak_blocks(llm, [prompt] * 4, [params] * 4)
    assert len(out.outputs) == 4 and shared < separate
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # four different samples


def test_n_greedy_samples_equal_one_greedy_run(llm):
    one = llm.generate(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0))[0]
    four = llm.generate(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0, n=4))[0]
    assert [c.token_ids for c in four.outputs] == [one.token_ids] * 4


def test_best_of_returns_the_n_most_likely(llm):
    out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=6, temperature=1.0, n=2, best_of=5, seed=1))[0]
    assert [c.index for c in out.outputs] == [0, 1]
    scores = [c.cumulative_logprob for c in out.outputs]
    assert scores == sorted(scores, reverse=True) and all(s is not None and s < 0 for s in scores)


def test_logprobs_are_the_models(llm):
    out = llm.generate(PROMPTS[2], SamplingParams(max_tokens=5, temperature=0, logprobs=3))[0]
    completion = out.outputs[0]
    ids = out.prompt_token_ids + completion.token_ids
    reference = prefill_logits(llm.engine.model, ids).log_softmax(-1)
    total = 0.0
    for step, (token, position) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = reference[len(out.prompt_token_ids) - 1 + step]
        assert position[token].rank == 1 and len(position) == 3  # greedy: the chosen token is the top one
        assert math.isclose(position[token].logprob, row[token].item(), abs_tol=1e-3)
        assert set(position) == set(row.topk(3).indices.tolist())
        total += position[token].logprob
    assert math.isclose(completion.cumulative_logprob, total, abs_tol=1e-4)


def test_prompt_logprobs(llm):
    out = llm.generate(PROMPTS[3], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2))[0]
    ids = out.prompt_token_ids
    reference = prefill_logits(llm.engine.model, ids).log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for i in range(1, len(ids)):
        entry = out.prompt_logprobs[i][ids[i]]
        assert math.isclose(entry.logprob, reference[i - 1, ids[i]].item(), abs_tol=1e-3)
        assert entry.rank == int((reference[i - 1] > reference[i - 1, ids[i]]).sum()) + 1


def test_stop_string_cuts_the_text_and_is_never_streamed(llm):
    plain = llm.generate(PROMPTS[4], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0].text
    stop = plain[len(plain) // 2:len(plain) // 2 + 4]
    engine = llm.engine
    engine.add_request("stop", PROMPTS[4], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]))
    streamed, final = "", None
    while engine.has_unfinished():
        for output in engine.step():
            streamed += output.delta_text
            final = output
    assert final.text == plain[:plain.index(stop)] == streamed
    assert final.finish_reason == "stop" and final.outputs[0].stop_reason == stop


def test_a_stop_string_in_every_sequence_ends_the_request_in_the_engine(llm):
    """Stop strings are found by the output processor: the first sequence's is passed to the engine as a
    stopped sequence while the second goes on, the second's ends the request; nothing is left running."""
    plain = llm.generate(PROMPTS[4], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    stop = plain.text[len(plain.text) // 2:len(plain.text) // 2 + 4]
    out = llm.generate(PROMPTS[4], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop], n=2))[0]
    for completion in out.outputs:
        assert completion.text == plain.text[:plain.text.index(stop)] and completion.stop_reason == stop
        assert len(completion.token_ids) < len(plain.token_ids)  # no token past the one that completed the stop
    assert not llm.engine.has_unfinished() and llm.engine.stats().num_running == 0


def test_stop_token_id_and_min_tokens(llm):
    plain = llm.generate(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].token_ids
    stopped = llm.generate(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[plain[3]]))[0]
    cut = plain.index(plain[3]) + 1
    assert stopped.token_ids == plain[:cut] and stopped.outputs[0].stop_reason == plain[3]
    held = llm.generate(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[plain[3]],
                                                   min_tokens=cut + 1))[0]
    assert len(held.token_ids) > cut


def test_eos_is_masked_until_min_tokens(llm):
    chat = [{"role": "user", "content": "Say OK."}]
    short = llm.chat(chat, SamplingParams(max_tokens=40, temperature=0))[0]
    assert short.finish_reason == "stop" and short.outputs[0].stop_reason is None  # ended by EOS
    longer = llm.chat(chat, SamplingParams(max_tokens=40, temperature=0, min_tokens=len(short.token_ids) + 3))[0]
    assert len(longer.token_ids) >= len(short.token_ids) + 3


def test_a_stop_tokens_text_is_not_output(llm):
    """Even with special tokens spelled out (tool parsers need that), the token that ends the text is not in it."""
    chat = [{"role": "user", "content": "Say OK."}]
    plain = llm.chat(chat, SamplingParams(max_tokens=40, temperature=0))[0].outputs[0]
    spelled = llm.chat(chat, SamplingParams(max_tokens=40, temperature=0, skip_special_tokens=False))[0].outputs[0]
    assert spelled.finish_reason == "stop" and spelled.token_ids == plain.token_ids
    assert spelled.text == plain.text and "<|im_end|>" not in spelled.text


def test_timeout_finishes_with_its_own_reason(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=500, temperature=0, ignore_eos=True, timeout=0.3))[0]
    assert out.finish_reason == "timeout" and 0 < len(out.token_ids) < 500
    assert llm.engine.stats().kv_blocks_free == llm.engine.stats().kv_blocks_total


def test_pooling_params_pool_the_prompt_and_sample_nothing(llm):
    """PoolingParams are apart from sampling: the request ends when its prompt is computed, with its vector."""
    from pagedllm import PoolingParams
    from pagedllm.sampling_params import SamplingParamsError
    from helpers import prefill_hidden

    generated = llm.engine.stats().generation_tokens_total
    last, mean = llm.embed([PROMPTS[1], PROMPTS[1]], [PoolingParams(), PoolingParams("mean", normalize=False)])
    assert llm.engine.stats().generation_tokens_total == generated and last.outputs == [] and last.finished
    hidden = prefill_hidden(llm.engine.model, last.prompt_token_ids).float()
    assert torch.allclose(last.embedding, torch.nn.functional.normalize(hidden[-1], dim=0), atol=1e-3)
    assert torch.allclose(mean.embedding, hidden.mean(0), atol=1e-3, rtol=1e-3)
    with pytest.raises(SamplingParamsError, match="pooling"):
        PoolingParams("max")
