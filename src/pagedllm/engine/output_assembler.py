"""Client side: a request's deltas (engine/deltas.py) put together into the RequestOutput a caller reads.

Each delta is applied once, in O(new tokens): text and token ids grow in place, so nothing per token
grows with the length of a stream. The RequestOutput handed out for a delta carries that delta
(`delta_text`, `delta_token_ids`, `delta_logprobs`) and the whole so far (`text`, `token_ids`,
`logprobs`); the lists are shared with later outputs of the same request, so a caller that keeps an
unfinished output and reads it later sees them grown.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .deltas import CompletionDelta, PositionEntries, RequestDelta
from .outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput


def position_logprobs(entries: PositionEntries) -> PositionLogprobs:
    """The chosen token and the top-N by id (the chosen one's own entry wins where it is in both)."""
    return {t: Logprob(lp, rank, text) for t, lp, rank, text in reversed(entries)}


@dataclass
class _Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None

    def apply(self, delta: CompletionDelta) -> CompletionOutput:
        self.text += delta.text
        self.token_ids += delta.token_ids
        new_logprobs = None
        if delta.logprobs is not None:
            new_logprobs = [position_logprobs(entries) for entries in delta.logprobs]
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs += new_logprobs
        return CompletionOutput(delta.index, self.text, self.token_ids, delta.cumulative_logprob, self.logprobs,
                                delta.finish_reason, delta.stop_reason, delta.text, delta.token_ids, new_logprobs)


@dataclass
class _Request:
    prompt_token_ids: list[int]
    prompt: str | None
    completions: dict[int, _Completion] = field(default_factory=dict)
    prompt_logprobs: list[PositionLogprobs | None] | None = None

    def apply(self, delta: RequestDelta) -> RequestOutput:
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = [None if e is None else position_logprobs(e) for e in delta.prompt_logprobs]
        outputs = [self.completions.setdefault(d.index, _Completion()).apply(d) for d in delta.completions]
        metrics = RequestMetrics(*delta.metrics) if delta.metrics is not None else None
        return RequestOutput(delta.request_id, self.prompt_token_ids, outputs, delta.finished, self.prompt,
                             self.prompt_logprobs, metrics, _embedding(delta.embedding))


def _embedding(data: bytes | None):
    if data is None:
        return None
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.float32)


class OutputAssembler:
    """The open requests of one client, by id: register each with `add`, then `apply` its deltas in order."""

    def __init__(self) -> None:
        self._requests: dict[str, _Request] = {}

    def add(self, request_id: str, prompt_token_ids: list[int], prompt: str | None) -> None:
        self._requests[request_id] = _Request(prompt_token_ids, prompt)

    def apply(self, delta: RequestDelta) -> RequestOutput:
        state = self._requests[delta.request_id]
        if delta.finished:
            del self._requests[delta.request_id]
        return state.apply(delta)

    def apply_all(self, deltas: list[RequestDelta]) -> list[RequestOutput]:
        return [self.apply(delta) for delta in deltas]

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
