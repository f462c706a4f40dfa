"""A request (what a user sent) as the engine tracks it: its sequences (samples), which share the prompt.

A request with n (or best_of) > 1 starts as one sequence that "fans out": when its prompt is computed,
the runner samples its one row of logits once per sample, and the engine forks the others from it,
sharing its KV blocks. Each sequence (engine/sequence.py) has its own seeded generator (and grammar matcher). Text, stop strings and
the choice among best_of sequences are the client's (engine/output_processor.py): every sequence's
new tokens go out each step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..sampling_params import SamplingParams
from .deltas import LogprobRow, RequestDelta, SequenceDelta
from .sequence import Sequence
from .search import Hypothesis, SearchStrategy


@dataclass
class Pooled:
    """A prompt's final hidden states reduced as they arrive, chunk by chunk: their sum and the last."""

    kind: str  # "last" or "mean"
    prompt_len: int
    normalize: bool = True
    rows: int = 0
    total: torch.Tensor | None = None
    last: torch.Tensor | None = None

    def add(self, start: int, hidden: torch.Tensor) -> None:
        """Rows for prompt positions start.. (a chunk seen before, recomputed after a preemption, is skipped)."""
        hidden = hidden[:self.prompt_len - start]  # generated tokens' rows are not the prompt's
        if start != self.rows or not len(hidden):
            return
        chunk = hidden.float().sum(0)
        self.total = chunk if self.total is None else self.total + chunk
        self.last, self.rows = hidden[-1].float(), self.rows + hidden.shape[0]

    def embedding(self) -> bytes:
        """The pooled vector (L2-normalised unless asked not to) as float32 bytes."""
        pooled = self.last if self.kind == "last" else self.total / self.rows
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=0)
        return pooled.cpu().numpy().tobytes()


@dataclass
class Request:
    request_id: str
    params: SamplingParams
    prompt_token_ids: list[int]
    generators: list[torch.Generator | None]  # one per sequence, made at admission so seeds are fixed
    deadline: float | None
    sequences: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[LogprobRow | None] | None = None
    prompt_logprobs_sent: bool = False
    closed: bool = False  # no more sequences will be forked (the deadline passed before they were)
    # Beam or contrastive search: its live sequences are `sequences`; its results come from it.
    search: SearchStrategy | None = None
    pooled: Pooled | None = None  # the prompt's hidden states so far, for a pooling (embedding) request

    @property
    def finished(self) -> bool:
        if self.search is not None:
            complete = self.search.done or self.closed
        else:
            complete = self.closed or len(self.sequences) == self.params.num_sequences
        return complete and all(s.finished for s in self.sequences)

    def take_delta(self) -> RequestDelta:
        """What is new since the last output: every sequence's delta (a search's results once, at its end),
        the prompt's logprobs once."""
        if self.search is not None:
            sequences = [_search_delta(i, h) for i, h in enumerate(self.search.results(self.params.n))]
        else:
            sequences = [s.take_delta() for s in self.sequences]
        first = self.sequences[0]
        finish_time = max(s.finish_time for s in self.sequences) if self.finished else None
        metrics = (first.arrival_time, first.first_token_time, finish_time,
                   sum(s.num_preemptions for s in self.sequences))
        embedding = self.pooled.embedding() if self.pooled is not None and self.finished else None
        return RequestDelta(self.request_id, sequences, self.finished, metrics, self._take_prompt_logprobs(),
                            embedding)

    def _take_prompt_logprobs(self) -> list[LogprobRow | None] | None:
        """The prompt's logprobs with the first delta (the prompt is computed before any token is sampled)."""
        if self.prompt_logprobs is None or self.prompt_logprobs_sent:
            return None
        self.prompt_logprobs_sent = True
        return self.prompt_logprobs


def _search_delta(index: int, found: Hypothesis) -> SequenceDelta:
    """A search reports once, at its end: all of its tokens are new then."""
    return SequenceDelta(index, list(found.token_ids), None, found.finish_reason, found.stop_reason,
                         cumulative_logprob=found.cumulative_logprob)
