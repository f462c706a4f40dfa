"""A request as the engine tracks it: prompt, output so far, and how much of it is in the cache."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from ..sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_TIMEOUT = "timeout"

    @property
    def finished(self) -> bool:
        return self.name.startswith("FINISHED")


@dataclass
class Request:
    """vLLM's rule: each step, `num_computed_tokens` catches up with `num_tokens` within a token
    budget. There is no separate prefill or decode phase."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # of the prompt, found in the prefix cache at the last admission
    num_preemptions: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    spec_token_ids: list[int] = field(default_factory=list)  # draft tokens to verify at the next step
    gang: str | None = None  # the search this sequence belongs to: its sequences advance together
    lora_id: int = 0  # the LoRA adapter it generates with (engine.loras), 0 for none

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_at(self, start: int, count: int) -> list[int]:
        """Tokens start..start+count-1 of prompt, output and drafts in a row, without joining the lists
        (a step reads a few tokens of each running request; joining costs the whole context)."""
        tokens: list[int] = []
        for part in (self.prompt_token_ids, self.output_token_ids, self.spec_token_ids):
            if len(tokens) == count:
                break
            if start < len(part):
                tokens += part[start:start + count - len(tokens)]
                start = 0
            else:
                start -= len(part)
        return tokens

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None
