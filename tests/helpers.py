"""Small helpers shared by tests."""

from __future__ import annotations

import torch

from pagedllm.engine.model_runner import ModelRunner, plan_kv_cache
from pagedllm.engine.request import Request
from pagedllm.engine.scheduler import ScheduledRequest
from pagedllm.models.transformer import Transformer
from pagedllm.sampling_params import SamplingParams


@torch.inference_mode()
def prefill_logits(model: Transformer, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits at every position of `ids`, computed in one paged forward pass."""
    spec = plan_kv_cache(model.config, block_size, model.config.kv_bytes_per_token(4) * (len(ids) + block_size),
                         torch.float32)
    runner = ModelRunner(model, spec, "cpu", torch.float32)
    batch = runner.prepare([ScheduledRequest(Request("x", ids, SamplingParams()), len(ids))],
                           [list(range(spec.num_blocks))])
    return model.compute_logits(model(batch.input_ids, batch.positions, runner.kv_caches, batch.meta))
