"""Front ends over the engine: the LLM class, the CLI, the OpenAI-compatible server, batch jobs."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import EngineConfig
    from ..engine.core_client import AsyncEngineClient
    from ..engine.llm_engine import LLMEngine


def create_engine(config: EngineConfig) -> LLMEngine:
    """The engine for `config`, with speculative decoding's proposers available to it."""
    # Imported here: the CLI imports this package, and `pagedllm --help` must not pay for torch.
    from ..engine.llm_engine import LLMEngine
    from ..spec_decode import make_proposer

    return LLMEngine(config, make_proposer=make_proposer)


def create_engine_client(config: EngineConfig, max_waiting_requests: int = 256,
                         data_parallel_size: int = 1) -> AsyncEngineClient:
    """`data_parallel_size` engine cores for `config`, each in a process of its own, and the client the
    server talks to them through."""
    from ..engine.core_client import AsyncEngineClient
    from ..spec_decode import make_proposer

    return AsyncEngineClient(config, max_waiting_requests, make_proposer, data_parallel_size=data_parallel_size)
