"""What the engine hands back each step, per request."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str  # all text generated so far
    token_ids: list[int]  # all tokens generated so far
    delta_text: str = ""  # the text completed by this step (for streaming)
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length" or "abort"
    prompt: str | None = None
    metrics: RequestMetrics | None = None


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

    @property
    def kv_usage(self) -> float:
        return 1 - self.kv_blocks_free / self.kv_blocks_total if self.kv_blocks_total else 0.0
