"""A sequence: one sample of a request (engine/request.py) as the scheduler, the KV cache and the runner
see it: prompt, output so far, how much of it is in the cache, and what its client has not been sent yet."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..sampling_params import SamplingParams
from .deltas import LogprobRow, SequenceDelta

if TYPE_CHECKING:
    import torch


class SequenceStatus(enum.Enum):
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
class Sequence:
    """vLLM's rule: each step, `num_computed_tokens` catches up with `num_tokens` within a token
    budget. There is no separate prefill or decode phase."""

    seq_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # of the prompt, found in the prefix cache at the last admission
    num_preemptions: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    spec_token_ids: list[int] = field(default_factory=list)  # draft tokens to verify at the next step
    gang: str | None = None  # the search this sequence belongs to: its sequences advance together
    lora_id: int = 0  # the LoRA adapter it generates with (engine.loras), 0 for none
    pools: bool = False  # its request pools the prompt's final hidden states (an embedding); nothing is sampled
    index: int = 0  # which of its request's samples it is
    generator: torch.Generator | None = None  # a seeded request's, one per sample
    stop_ids: frozenset[int] = frozenset()  # the tokens that end it (engine/stop_rule.py): masked before min_tokens
    # n > 1: its first token is drawn once per sample, with these generators; the others fork from it then.
    fan_out: list[torch.Generator | None] = field(default_factory=list)
    grammar: Any = None  # an llguidance matcher when the request asks for structured output
    # Not sent to the client yet:
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[LogprobRow] | None = None  # [] when the request reports or ranks by logprobs
    stop_reason: int | None = None  # the stop token id that ended it
    ends_with_stop_token: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def needs_every_prompt_row(self) -> bool:
        """Prompt logprobs and pooling read every prompt position: no cached prefix may be skipped."""
        return self.sampling_params.prompt_logprobs is not None or self.pools

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_at(self, start: int, count: int) -> list[int]:
        """Tokens start..start+count-1 of prompt, output and drafts in a row, without joining the lists
        (a step reads a few tokens of each running sequence; joining costs the whole context)."""
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
    def finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def take_delta(self) -> SequenceDelta:
        """What this sequence gained since the last output; the deltas start afresh after."""
        out = SequenceDelta(self.index, self.delta_token_ids, self.delta_logprobs, self.finish_reason,
                            self.stop_reason, self.ends_with_stop_token)
        self.delta_token_ids = []
        self.delta_logprobs = [] if self.delta_logprobs is not None else None
        return out
