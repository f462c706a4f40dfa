"""Draft-model speculation on the tiny random models (they share the default tokenizer's 49152-token
vocabulary): greedy output equals decoding without speculation, whatever the draft proposes."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.config import SpeculativeConfig
from pagedllm.errors import ConfigError, PagedLLMError


def _prompts(count: int) -> list[dict]:
    rng = torch.Generator().manual_seed(5)
    return [{"prompt_token_ids": torch.randint(3, 49152, (int(torch.randint(3, 40, (1,), generator=rng)),),
                                               generator=rng).tolist()} for _ in range(count)]


def _run(target, draft=None, k: int = 4):
    spec = {"model": str(draft), "num_speculative_tokens": k} if draft is not None else None
    llm = LLM(str(target), kv_cache_memory=16 * 2**20, block_size=4, max_num_batched_tokens=128,
              speculative_config=spec)
    params = [SamplingParams(max_tokens=20 + i % 7, temperature=0, ignore_eos=True) for i in range(24)]
    return llm, [o.token_ids for o in llm.generate(_prompts(24), params)]


@pytest.mark.parametrize("draft_family", ["qwen2", "llama"])
def test_draft_model_greedy_equals_plain_greedy(tiny_models, draft_family):
    """A foreign draft (qwen2: almost every guess rejected) and the target itself as draft (every
    guess accepted) both leave the output unchanged."""
    target = tiny_models["llama"].gguf_path
    _, plain = _run(target)
    llm, speculative = _run(target, tiny_models[draft_family].gguf_path)
    assert speculative == plain
    stats = llm.engine.stats()
    assert stats.spec_draft_tokens > 0 and stats.kv_blocks_free == stats.kv_blocks_total
    if draft_family == "llama":
        assert stats.spec_acceptance_rate > 0.95
    else:
        assert stats.spec_acceptance_rate < 0.2
    assert not llm.engine.proposer.mirrors or llm.engine.proposer.kv_cache.num_free_blocks > 0


def test_draft_model_config_is_checked(tmp_path, tiny_models):
    with pytest.raises(ConfigError, match="draft model path"):
        SpeculativeConfig(method="draft_model")
    assert SpeculativeConfig(model="x.gguf").method == "draft_model"
    with pytest.raises(PagedLLMError):
        LLM(str(tiny_models["llama"].gguf_path), speculative_config={"model": str(tmp_path / "missing.gguf")})
