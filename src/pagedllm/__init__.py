"""pagedllm: an LLM inference engine — GGUF and Hugging Face models, one transformer, paged KV cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "PoolingParams", "LLMEngine", "EngineConfig", "RequestOutput", "CompletionOutput", "Logprob", "infer",
           "BatchSummary"]

if TYPE_CHECKING:
    from .config import EngineConfig
    from .engine.llm_engine import LLMEngine
    from .entrypoints.llm import LLM
    from .engine.outputs import CompletionOutput, Logprob, RequestOutput
    from .entrypoints.batch import BatchSummary, infer
    from .pooling_params import PoolingParams
    from .sampling_params import SamplingParams

_LAZY = {"LLM": "entrypoints.llm", "SamplingParams": "sampling_params", "PoolingParams": "pooling_params", "LLMEngine": "engine.llm_engine",
         "EngineConfig": "config", "RequestOutput": "engine.outputs", "CompletionOutput": "engine.outputs",
         "Logprob": "engine.outputs", "infer": "entrypoints.batch", "BatchSummary": "entrypoints.batch"}


def __getattr__(name: str):
    # Lazy, so `pagedllm --help` does not pay for importing torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'pagedllm' has no attribute {name!r}")
