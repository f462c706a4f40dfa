"""What the engine hands back each step, per request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass(frozen=True)
class Logprob:
    """One token's log-probability under the model (before any sampling setting) and its rank
    (1 = the most likely token)."""

    logprob: float
    rank: int
    decoded_token: str | None = None


# Per position: the chosen token and the top-N alternatives, by token id.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One of a request's `n` completions."""

    index: int
    text: str  # all text generated so far (stop strings excluded)
    token_ids: list[int]  # all tokens generated so far
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None  # one entry per token, when asked for
    finish_reason: str | None = None  # "stop", "length", "abort" or "timeout"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    delta_text: str = ""  # the text completed by this step (for streaming)
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[PositionLogprobs] | None = None  # the logprobs of delta_token_ids, when asked for

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt: str | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # None for the first prompt token
    metrics: RequestMetrics | None = None
    embedding: torch.Tensor | None = None  # float32 [hidden], L2-normalised: a request with `pooling`, once finished

    # The first completion's fields, for the common n == 1 case.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def delta_text(self) -> str:
        return self.outputs[0].delta_text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    num_preemptions: int
    prefix_cache_hit_rate: float
    prompt_tokens_total: int = 0  # prompt tokens computed (prefix-cache hits excluded)
    generation_tokens_total: int = 0
    prompt_tok_s: float = 0.0  # over the last few seconds of steps
    generation_tok_s: float = 0.0
    spec_draft_tokens: int = 0  # speculative draft tokens checked by the model
    spec_accepted_tokens: int = 0  # ... and accepted

    @property
    def spec_acceptance_rate(self) -> float:
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else 0.0

    @property
    def kv_usage(self) -> float:
        return 1 - self.kv_blocks_free / self.kv_blocks_total if self.kv_blocks_total else 0.0
