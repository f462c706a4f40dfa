"""A model whose every layer keeps to a sliding window holds only its window's blocks (issue 35): the blocks
behind the window go back to the pool as a sequence moves on, and the tokens do not change."""

from __future__ import annotations

import torch

from pagedllm import LLM, SamplingParams
from pagedllm.config import ModelConfig

NEW_TOKENS, BLOCK = 120, 4


def _run(model: str, free_behind: bool, monkeypatch) -> tuple[list[int], int]:
    """Greedy tokens of one long sequence, and the most blocks it held at once."""
    if not free_behind:
        monkeypatch.setattr(ModelConfig, "uniform_window", lambda self: None)
    llm = LLM(model, kv_cache_memory=4 * 2**20, block_size=BLOCK, enable_prefix_caching=False)
    engine = llm.engine
    prompt = torch.randint(3, 1000, (6,), generator=torch.Generator().manual_seed(3)).tolist()
    engine.add_request("long", {"prompt_token_ids": prompt},
                       SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    most, tokens = 0, []
    while engine.has_unfinished():
        for output in engine.step():
            tokens = output.outputs[0].token_ids
        stats = engine.stats()
        most = max(most, stats.kv_blocks_total - stats.kv_blocks_free)
    monkeypatch.undo()
    return tokens, most


def test_blocks_behind_the_window_go_back_to_the_pool(tiny_models, monkeypatch):
    """The tiny mistral's window is 8 tokens: 126 tokens held 32 blocks of 4, now at most 4 (8 / 4 + the
    block being written + one part-used at the window's back); the tokens are the same either way."""
    model = str(tiny_models["mistral"].gguf_path)
    kept, kept_most = _run(model, free_behind=False, monkeypatch=monkeypatch)
    freed, freed_most = _run(model, free_behind=True, monkeypatch=monkeypatch)
    assert freed == kept and len(freed) == NEW_TOKENS
    assert kept_most >= (6 + NEW_TOKENS) // BLOCK - 1  # the last step frees them all before stats are read
    assert freed_most <= 8 // BLOCK + 2, freed_most


def test_models_with_global_layers_keep_every_block(tiny_models):
    """Gemma 3's full-attention layers read the whole context: nothing is freed."""
    config = LLM(str(tiny_models["gemma3"].gguf_path), kv_cache_memory=2**20).engine.model.config
    assert config.uniform_window() is None
    assert LLM(str(tiny_models["mistral"].gguf_path), kv_cache_memory=2**20).engine.model.config.uniform_window() == 8
