"""The runner answers per sequence (ModelRunnerOutput): which logits rows each sequence samples is its
business alone — a fan-out's one row drawn once per sample, a row per draft, prompt logprobs and kept
hidden states keyed by sequence id."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.engine.scheduler import ScheduledSequence
from pagedllm.engine.sequence import Sequence
from helpers import prefill_hidden, prefill_logits


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return LLM(str(tiny_models["llama"].gguf_path), kv_cache_memory=8 * 2**20, block_size=4)


def _prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, 1000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_one_step_answers_each_sequence(tiny):
    engine = tiny.engine
    greedy = SamplingParams(temperature=0, logprobs=1)
    fan = Sequence("fan", _prompt(1, 6), SamplingParams(temperature=0, n=3, logprobs=1), fan_out=[None] * 3)
    drafted = Sequence("drafted", _prompt(2, 5), greedy, spec_token_ids=[7, 8])
    scored = Sequence("scored", _prompt(3, 7), SamplingParams(prompt_logprobs=2))
    pooled = Sequence("pooled", _prompt(4, 5), SamplingParams(max_tokens=1), pools=True)
    scheduled = [ScheduledSequence(fan, 6), ScheduledSequence(drafted, 7, num_spec_tokens=2),
                 ScheduledSequence(scored, 3), ScheduledSequence(pooled, 5)]
    tables = [[0, 1], [2, 3], [4, 5], [6, 7]]

    out = engine.runner.execute_model(scheduled, tables, engine.grammars.allowed)

    fan_best = int(prefill_logits(engine.model, fan.prompt_token_ids)[-1].argmax())
    assert out.sampled["fan"] == [fan_best] * 3
    assert [len(row) for row in out.logprobs["fan"]] == [2, 2, 2]  # the sampled token and the top 1
    draft_logits = prefill_logits(engine.model, drafted.prompt_token_ids + [7, 8])[-3:]
    assert out.sampled["drafted"] == draft_logits.argmax(dim=-1).tolist()  # one token per row: last, each draft
    start, rows = out.prompt_logprobs["scored"]
    assert start == 0 and len(rows) == 3 and all(len(row) == 3 for row in rows)
    assert rows[0][0][0] == scored.prompt_token_ids[1]  # the row scores the prompt's next token
    assert "scored" not in out.sampled and "pooled" not in out.sampled  # a chunk short of its end samples nothing
    first, states = out.hidden["pooled"]
    assert first == 0 and torch.allclose(states, prefill_hidden(engine.model, pooled.prompt_token_ids), atol=1e-4)
