"""Speculative (assisted) decoding: cheap proposers guess the next tokens, the target model checks
them all in one forward pass, and greedy output stays exactly what plain decoding gives."""

from __future__ import annotations

import torch

from ..config import SpeculativeConfig
from ..models.loaders import resolve_model
from .draft_model import DraftModelProposer
from .ngram import NgramProposer


def make_proposer(spec: SpeculativeConfig, vocab_size: int, device: torch.device, dtype: torch.dtype, block_size: int,
                  attention_backend: str) -> NgramProposer | DraftModelProposer:
    """The proposer `spec` asks for, for a target model of this vocabulary (the engine's ProposerFactory)."""
    if spec.method == "ngram":
        return NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_max, spec.prompt_lookup_min)
    return DraftModelProposer(resolve_model(spec.model), spec.num_speculative_tokens, vocab_size, device, dtype,
                              spec.draft_kv_cache_memory_bytes, block_size, attention_backend)
