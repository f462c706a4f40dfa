"""Every family, through both loaders, against Hugging Face transformers (fp32)."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.models.loaders import ModelSource, load_model
from helpers import prefill_logits

FAMILIES = ["llama", "qwen2", "mistral"]
LOADERS = ["hf", "gguf"]


def _source(tiny, kind: str) -> ModelSource:
    return ModelSource("hf", tiny.hf_dir) if kind == "hf" else ModelSource("gguf", tiny.gguf_path)


def _prompt(length: int = 24, seed: int = 0) -> list[int]:
    return torch.randint(3, 49152, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tiny_models, family, loader):
    tiny = tiny_models[family]
    ids = _prompt()
    ours = prefill_logits(load_model(_source(tiny, loader)), ids, block_size=4)
    with torch.no_grad():
        ref = tiny.hf_model(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_32_greedy_tokens_match_transformers(tiny_models, family, loader):
    tiny = tiny_models[family]
    ids = _prompt(12, seed=1)
    source = tiny.hf_dir if loader == "hf" else tiny.gguf_path
    llm = LLM(str(source), kv_cache_memory=4 * 2**20, block_size=4)
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
    with torch.no_grad():
        ref = tiny.hf_model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert out.token_ids == ref[0, len(ids):].tolist()
    assert out.finish_reason == "length"


def test_sliding_window_changes_the_result(tiny_models):
    """The mistral window (8) is shorter than the prompt, so ignoring it must change logits."""
    from dataclasses import replace

    model = load_model(ModelSource("hf", tiny_models["mistral"].hf_dir))
    ids = _prompt()
    windowed = prefill_logits(model, ids)
    model.config = replace(model.config, sliding_window=None)
    assert (prefill_logits(model, ids) - windowed).abs().max().item() > 1e-3


def test_written_gguf_loads_in_transformers(tiny_models):
    """Our GGUF writer produces files transformers' own GGUF loader reads to the same model."""
    from transformers import AutoModelForCausalLM

    tiny = tiny_models["qwen2"]
    hf_from_gguf = AutoModelForCausalLM.from_pretrained(str(tiny.gguf_path.parent), gguf_file=tiny.gguf_path.name,
                                                        dtype=torch.float32)
    ids = torch.tensor([_prompt()])
    with torch.no_grad():
        assert (hf_from_gguf(ids).logits - tiny.hf_model(ids).logits).abs().max().item() < 1e-4
