"""Probes in the engine core run in slices between engine steps (issue 34): a long probe no longer stalls
the streams being served, and neither the probe nor the streams are changed by the other."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.engine.core import MAX_PROBE_JOBS, EngineCore, QueueFullError
from pagedllm.tools import inspect
from pagedllm.tools.inspect import inspect_model


@pytest.fixture
def sliced(monkeypatch):
    monkeypatch.setattr(inspect, "PREFILL_SLICE_TOKENS", 4)
    monkeypatch.setattr(inspect, "LENS_SLICE_ROWS", 3)


def _tokens(seed: int, length: int) -> list[int]:
    return torch.randint(3, 1000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_a_probe_runs_in_slices_between_engine_steps(tiny_models, sliced):
    llm = LLM(str(tiny_models["llama"].gguf_path), kv_cache_memory=8 * 2**20, block_size=4)
    prompt, probed = _tokens(1, 6), _tokens(2, 10)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = llm.generate([{"prompt_token_ids": prompt}], greedy)[0].outputs[0].token_ids
    whole = inspect_model(llm.engine.model, probed, top_k=3, block_size=4, attention=["1:0:*:*"]).as_json()

    core, tokens = EngineCore(llm.engine), []

    def step() -> None:
        tokens.extend(t for delta in core.step() for sequence in delta.sequences for t in sequence.token_ids)

    llm.engine.add_request("stream", {"prompt_token_ids": prompt}, greedy)
    job, steps_between, slices, result = core.probe(probed, None, 3, ["1:0:*:*"], None), 0, 0, None
    while result is None:
        if core.has_work():
            step()
            steps_between += 1
        result, slices = job.advance(llm.engine), slices + 1
    while core.has_work():
        step()

    # 3 prefill chunks, 2 layers × 4 lens slices, one attention slice; the stream stepped in between
    assert slices == 3 + 2 * 4 + 1 and steps_between == slices
    assert result == whole
    assert tokens == expected


def test_probes_past_the_job_bound_are_refused(tiny_models):
    llm = LLM(str(tiny_models["llama"].gguf_path), kv_cache_memory=8 * 2**20, block_size=4)
    core = EngineCore(llm.engine)
    core.probes = {i: core.probe([5, 6, 7], [0], 2, [], None) for i in range(MAX_PROBE_JOBS)}
    with pytest.raises(QueueFullError, match="probes are already running"):
        core.probe([5, 6, 7], [0], 2, [], None)
