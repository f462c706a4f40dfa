"""Probes: look inside a model layer by layer on one prompt.

Per decoder layer: the cosine distance between the layer's input and output hidden states (how
much the layer turns the residual stream), the norm of its output (the residual stream's size),
and the logit lens — the top-K next tokens read from that layer's output through the final norm
and the output head. The prompt runs as one prefill on a private KV cache of its own, so the
engine's cache and its other requests are untouched; the model sees the layers through the
`observe` plug point of Transformer.forward, which costs nothing when no one observes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..attention import kv_bytes_per_token
from ..engine.model_runner import ModelRunner, plan_kv_cache
from ..engine.request import Request
from ..engine.scheduler import ScheduledRequest
from ..models.transformer import Transformer
from ..sampling_params import SamplingParams


@dataclass
class LayerProbe:
    """One layer's readings; the lists run over the prompt's positions."""

    layer: int
    cos_distance: list[float]
    residual_norm: list[float]
    top_k: list[list[tuple[int, float]]]  # per position: (token id, logprob) from the logit lens, best first

    def summary(self) -> dict:
        """The last position's readings (what the next token is decided from)."""
        return {"layer": self.layer, "cos_distance": self.cos_distance[-1], "residual_norm": self.residual_norm[-1],
                "top_k": [list(pair) for pair in self.top_k[-1]]}


@dataclass
class Inspection:
    token_ids: list[int]
    layers: list[LayerProbe] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"token_ids": self.token_ids, "layers": [probe.summary() for probe in self.layers]}


def _checked_layers(layers: list[int] | None, count: int) -> list[int]:
    if layers is None:
        return list(range(count))
    wrong = [i for i in layers if not 0 <= i < count]
    if wrong:
        raise ValueError(f"layers: this model has layers 0..{count - 1}; got {wrong[0]}")
    return sorted(set(layers))


@torch.inference_mode()
def inspect_model(model: Transformer, token_ids: list[int], layers: list[int] | None = None,
                  top_k: int = 10, block_size: int = 16) -> Inspection:
    """Probe `layers` (all by default) of `model` on `token_ids`."""
    if not token_ids:
        raise ValueError("the prompt is empty")
    cfg = model.config
    chosen = _checked_layers(layers, cfg.num_hidden_layers)
    outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def observe(index: int, before: torch.Tensor, after: torch.Tensor) -> None:
        if index in chosen:
            outputs[index] = (before.float(), after.float())

    dtype = model.norm.weight.dtype
    device = model.norm.weight.device
    spec = plan_kv_cache(cfg, block_size, kv_bytes_per_token(cfg, dtype) * (len(token_ids) + block_size), dtype)
    runner = ModelRunner(model, spec, device, dtype)
    request = Request("inspect", list(token_ids), SamplingParams(max_tokens=1))
    batch = runner.prepare([ScheduledRequest(request, len(token_ids))], [list(range(spec.num_blocks))])
    model(batch.input_ids, batch.positions, runner.kv_caches, batch.meta, observe=observe)
    inspection = Inspection(list(token_ids))
    for index in chosen:
        before, after = outputs[index]
        lens = torch.log_softmax(model.compute_logits(model.norm(after.to(dtype))).float(), dim=-1)
        values, ids = lens.topk(min(top_k, lens.shape[-1]), dim=-1)
        inspection.layers.append(LayerProbe(
            index, (1 - torch.nn.functional.cosine_similarity(before, after, dim=-1)).tolist(),
            after.norm(dim=-1).tolist(),
            [list(zip(row_ids.tolist(), row_values.tolist())) for row_ids, row_values in zip(ids, values)]))
    return inspection
