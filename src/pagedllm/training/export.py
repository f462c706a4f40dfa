"""A fully fine-tuned model written back as a checkpoint `pagedllm serve` loads: a Hugging Face folder
for the families pagedllm writes as such (llama, mistral, qwen2, qwen3), a float32 GGUF file otherwise.

The trained tensors come back under their canonical names (Transformer.checkpoint_tensors) and into the
checkpoint's row order (training/lora.checkpoint_order); tensors a family's checkpoints keep fused
(Phi-3's qkv_proj) take each part on its rows, as --merge-lora does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.loaders import ModelSource, read_model_config
from ..tools.export import HF_TARGETS, ConvertPlan, canonical_weights, tensor_rows, write_model
from .lora import checkpoint_order


def trained_weights(model, source: ModelSource, split: bool) -> dict[str, torch.Tensor]:
    """The source's canonical float32 tensors with the model's trained values in their place."""
    config, family = read_model_config(source)
    _, weights = canonical_weights(source, split=split)
    for name, values in model.checkpoint_tensors():
        values = checkpoint_order(name, values.detach().float().cpu(), config, family)
        target, offset, size = tensor_rows(weights, name, config)
        weights[target].narrow(0, offset, size).copy_(values)
    return weights


def write_trained_model(model, source: ModelSource, folder: Path) -> tuple[Path, str]:
    """Write the model into run `folder`: where it went (`model/` or `model.gguf`) and what convert would print."""
    config, _ = read_model_config(source)
    out = folder / "model" if config.family in HF_TARGETS else folder / "model.gguf"
    weights = trained_weights(model, source, split=out.suffix != ".gguf")
    return out, write_model(source, config, weights, out, ConvertPlan())
