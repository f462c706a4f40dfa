"""Front ends over the engine: the LLM class, the CLI, the OpenAI-compatible server, batch jobs."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import EngineConfig
    from ..engine.llm_engine import LLMEngine


def create_engine(config: EngineConfig) -> LLMEngine:
    """The engine for `config`, with speculative decoding's proposers available to it."""
    # Imported here: the CLI imports this package, and `pagedllm --help` must not pay for torch.
    from ..engine.llm_engine import LLMEngine
    from ..spec_decode import make_proposer

    return LLMEngine(config, make_proposer=make_proposer)
