"""Decode steps padded to graph buckets (engine/cuda_graphs.py). Without CUDA the padded step runs
eagerly over the same static tensors a graph would keep, so this checks what a replay computes:
padding rows change nothing a sequence sees (same logits as the unpadded step) and write only the
scratch block. Capture and replay themselves run where a GPU is (the engine's default there)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported

from pagedllm.attention.triton import triton_available
from pagedllm.engine.cuda_graphs import GraphConfig, batch_buckets
from pagedllm.engine.model_runner import ModelRunner, plan_kv_cache
from pagedllm.engine.sequence import Sequence
from pagedllm.engine.scheduler import ScheduledSequence
from pagedllm.models.loaders import ModelSource, load_model
from pagedllm.sampling_params import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_buckets_cover_every_batch_size():
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert batch_buckets(3) == (1, 2, 3)
    assert batch_buckets(20) == (1, 2, 4, 8, 16, 20)
    config = GraphConfig(batch_buckets(20), 4)
    assert [config.bucket(n) for n in (1, 3, 5, 17, 20, 21)] == [1, 4, 8, 20, 20, None]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(5)
    folder = tmp_path_factory.mktemp("graph-llama")
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return load_model(ModelSource("hf", folder), DEVICE)


def _steps(runner: ModelRunner, prompts: list[list[int]], decodes: int) -> list[torch.Tensor]:
    """Prefill every prompt in one step, then `decodes` steps of one token each (token 7 + step)."""
    requests = [Sequence(f"r{i}", list(p), SamplingParams()) for i, p in enumerate(prompts)]
    tables = [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(len(prompts))]  # blocks of 4: 12 tokens each
    logits, padded = [], []
    for step in range(decodes + 1):
        scheduled = [ScheduledSequence(r, r.num_tokens - r.num_computed_tokens) for r in requests]
        batch = runner.prepare(scheduled, tables)
        padded.append(batch.padded)
        logits.append(runner.execute(batch).logits)
        for r in requests:
            r.num_computed_tokens = r.num_tokens
            r.output_token_ids.append(7 + step)
    return logits, padded


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (make test installs it)")
def test_padded_decode_steps_equal_unpadded_ones(model):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]]
    spec = plan_kv_cache(model.config, 4, 2048 * 12, torch.float32)  # 12 blocks: 9 used, 3 never handed out
    assert spec.num_blocks >= 9
    graphs = GraphConfig((1, 2, 4, 8), max_blocks=5, capture=DEVICE == "cuda")
    padded_runner = ModelRunner(model, spec, DEVICE, torch.float32, "triton", graphs=graphs)
    plain_runner = ModelRunner(model, spec, DEVICE, torch.float32, "triton")
    assert padded_runner.graphs is not None and plain_runner.graphs is None
    got, padded = _steps(padded_runner, prompts, 4)
    want, _ = _steps(plain_runner, prompts, 4)
    assert padded == [False, True, True, True, True]  # 3 decodes run as a bucket of 4
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    pool = padded_runner.kv_pool
    assert pool.shape[2] == spec.num_blocks + 1  # the scratch block past the planned ones
    assert pool[:, :, spec.num_blocks].abs().sum() > 0  # the padding row wrote there...
    assert pool[:, :, 9:spec.num_blocks].abs().sum() == 0  # ...and nowhere a sequence could own
    torch.testing.assert_close(pool[:, :, :9], plain_runner.kv_pool[:, :, :9])
