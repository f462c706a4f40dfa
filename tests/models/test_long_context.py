"""The KV pool's dtype at long context (issue 35): `auto` is float16 for packed weights, float32 for the
reference path; the default model's greedy tokens after an 8k-token prompt are the same with a float16 pool
as with float32, until a near-tie."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedllm import LLM, SamplingParams, kernels

PROMPT_TOKENS, NEW_TOKENS = 8000, 12
NEAR_TIE = 0.1  # logprob gap between the float32 pool's two best tokens where the pools may part


@pytest.fixture(scope="module")
def prompt(default_gguf) -> list[int]:
    """Real text (an early copy of the README, kept apart: the live one's edits moved the near-ties) of
    PROMPT_TOKENS tokens."""
    llm = LLM(str(default_gguf), kv_cache_memory=2**20)
    text = (Path(__file__).parent / "data" / "long_context_prompt.md").read_text(encoding="utf-8")
    ids = llm.get_tokenizer().encode(text)
    return (ids * (PROMPT_TOKENS // len(ids) + 1))[:PROMPT_TOKENS]


def _greedy(default_gguf, prompt: list[int], kv_dtype: str):
    llm = LLM(str(default_gguf), kv_cache_dtype=kv_dtype, kv_cache_memory=400 * 2**20, max_model_len=8192,
              enable_prefix_caching=False)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=2)
    return llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0]


def test_a_float16_pool_keeps_the_float32_tokens_at_8k(default_gguf, prompt):
    """~25 s a run here: one pair only (bfloat16 and q8_0 are checked at short context in
    tests/engine/test_engine.py)."""
    reference, sixteen = _greedy(default_gguf, prompt, "float32"), _greedy(default_gguf, prompt, "float16")
    same = next((i for i, (a, b) in enumerate(zip(reference.token_ids, sixteen.token_ids)) if a != b), NEW_TOKENS)
    if same < NEW_TOKENS:  # they part only where float32's two best tokens were nearly tied
        best_two = sorted(reference.logprobs[same].values(), key=lambda lp: -lp.logprob)[:2]
        assert best_two[0].logprob - best_two[1].logprob < NEAR_TIE, (same, best_two)


def test_auto_picks_16_bits_for_packed_weights_and_float32_for_the_reference(default_gguf):
    """And attention's products: bfloat16 where the packed layers' GEMMs are (a CPU that multiplies it
    natively), float32 for the reference."""
    packed = LLM(str(default_gguf), kv_cache_memory=2**20)
    reference = LLM(str(default_gguf), kv_cache_memory=2**20, quantization="none")
    assert packed.engine.runner.kv_pool.dtype == torch.float16
    assert reference.engine.runner.kv_pool.dtype == torch.float32
    attention = [llm.engine.model.layers[0].self_attn.layer_attention() for llm in (packed, reference)]
    assert attention[0].bfloat16_products == kernels.cpu_multiplies_bfloat16()
    assert not attention[1].bfloat16_products
