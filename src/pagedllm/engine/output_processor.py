"""Client side: a request's deltas (engine/deltas.py) turned into the RequestOutputs a caller reads.

The engine core sends token ids; everything textual happens here, in the front end's process, while the
core computes its next step: incremental detokenisation, stop strings, the texts of logprob entries, the
choice of the n best of best_of sequences and the decoding of a search's results. A pooling request
(PoolingParams) has no sequences to show: its one output, once finished, carries the embedding.

A stop string found here ends its sequence at once for the caller; the core is told through `stop_sequence`
(or `abort` once no sequence of the request goes on), so it may have computed a token or two past it,
which are dropped. Each delta is applied in O(new tokens): text and token ids grow in place, so nothing
per token grows with the length of a stream. The RequestOutput handed out for a delta carries that delta
(`delta_text`, `delta_token_ids`, `delta_logprobs`) and the whole so far (`text`, `token_ids`,
`logprobs`); the lists are shared with later outputs of the same request, so a caller that keeps an
unfinished output and reads it later sees them grown.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

from ..pooling_params import PoolingParams
from ..sampling_params import SamplingParams
from ..tokenizer import IncrementalDetokenizer, Tokenizer
from .deltas import LogprobRow, RequestDelta, SequenceDelta
from .outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from .stop_strings import StopStringMatcher


class _TokenTexts:
    """Each token's own text, for logprob entries (cached: a vocabulary's worth at most)."""

    def __init__(self, tokenizer: Tokenizer):
        self.text = lru_cache(maxsize=1 << 18)(lambda token: tokenizer.decode([token], skip_special_tokens=False))

    def position(self, row: LogprobRow) -> PositionLogprobs:
        """The chosen token and the top-N by id (the chosen one's own entry wins where it is in both)."""
        return {t: Logprob(lp, rank, self.text(t)) for t, lp, rank in reversed(row)}


@dataclass
class _Sequence:
    """One sample of a request as its caller sees it."""

    index: int
    detokenizer: IncrementalDetokenizer
    matcher: StopStringMatcher
    logprobs: list[PositionLogprobs] | None  # [] when the request reports logprobs
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def apply(self, delta: SequenceDelta, texts: _TokenTexts) -> _New:
        """Take the delta's tokens up to the end of the sequence (a stop string may end it before the core
        does): what is new."""
        new = _New([] if self.logprobs is not None else None)
        if self.finish_reason is not None:  # stopped here already: what the core computed after is dropped
            return new
        pieces, last = [], len(delta.token_ids) - 1
        for i, token in enumerate(delta.token_ids):
            new.token_ids.append(token)
            if delta.logprobs is not None:
                self.cumulative_logprob += delta.logprobs[i][0][1]
                if new.logprobs is not None:
                    new.logprobs.append(texts.position(delta.logprobs[i]))
            # A stop token's own text is not output, even where special tokens are spelled out (as vLLM).
            hidden = i == last and delta.ends_with_stop_token
            pieces.append(self.matcher.feed("" if hidden else self.detokenizer.add(token)))
            if self.matcher.stopped_by is not None:
                self.finish_reason, self.stop_reason = "stop", self.matcher.stopped_by
                break
        if self.finish_reason is None and delta.finish_reason is not None:
            self._finish(delta, pieces)
        new.text = "".join(pieces)
        self.text += new.text
        self.token_ids += new.token_ids
        if self.logprobs is not None:
            self.logprobs += new.logprobs
        return new

    def _finish(self, delta: SequenceDelta, pieces: list[str]) -> None:
        """The core ended the sequence: release held-back text, unless its last bytes complete a stop string."""
        pieces.append(self.matcher.feed(self.detokenizer.flush()))
        pieces.append(self.matcher.flush())
        if self.matcher.stopped_by is not None:
            self.finish_reason, self.stop_reason = "stop", self.matcher.stopped_by
        else:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason

    def output(self, index: int, new: _New, with_cumulative: bool) -> CompletionOutput:
        return CompletionOutput(index, self.text, self.token_ids, self.cumulative_logprob if with_cumulative else None,
                                self.logprobs, self.finish_reason, self.stop_reason, new.text, new.token_ids,
                                new.logprobs)


@dataclass
class _New:
    """What a delta added to one sequence."""

    logprobs: list[PositionLogprobs] | None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)


class _Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], prompt: str | None, params: SamplingParams):
        self.request_id, self.prompt_token_ids, self.prompt, self.params = request_id, prompt_token_ids, prompt, params
        self.sequences: dict[int, _Sequence] = {}
        self.prompt_logprobs: list[PositionLogprobs | None] | None = None
        # Outputs go out as tokens arrive, except when best_of picks among more than n or for a search
        # (its sequences are only candidates until it ends).
        self.streams = params.search is None and params.num_sequences == params.n
        self.with_cumulative = params.logprobs is not None or not self.streams

    def new_sequence(self, index: int, tokenizer: Tokenizer) -> _Sequence:
        params = self.params
        return _Sequence(index, IncrementalDetokenizer(tokenizer, self.prompt_token_ids, params.skip_special_tokens),
                         StopStringMatcher(params.stop), [] if params.logprobs is not None else None)

    @property
    def all_stopped(self) -> bool:
        """Every sequence of a sampled request has ended here (some by a stop string the core has not seen)."""
        return self.params.search is None and len(self.sequences) == self.params.num_sequences \
            and all(s.finish_reason is not None for s in self.sequences.values())

    def output(self, delta: RequestDelta, news: dict[int, _New], finished: bool) -> RequestOutput:
        if self.streams or self.params.search is not None:  # a search's results come ranked
            outputs = [self.sequences[i].output(i, news[i], self.with_cumulative) for i in sorted(news)]
        else:  # best_of: the n best, renumbered; all of their text is new now
            best = sorted(self.sequences.values(), key=lambda s: s.cumulative_logprob, reverse=True)[:self.params.n]
            outputs = [s.output(i, _New(s.logprobs, s.text, s.token_ids), True) for i, s in enumerate(best)]
        metrics = RequestMetrics(*delta.metrics) if delta.metrics is not None else None
        if metrics is not None and finished and metrics.finish_time is None:
            metrics.finish_time = time.monotonic()  # ended here by a stop string
        return RequestOutput(self.request_id, self.prompt_token_ids, outputs, finished, self.prompt,
                             self.prompt_logprobs, metrics, _embedding(delta.embedding))


@dataclass
class _Pooling:
    """An embedding request: nothing but its vector, at its end."""

    request_id: str
    prompt_token_ids: list[int]
    prompt: str | None

    def output(self, delta: RequestDelta) -> RequestOutput:
        metrics = RequestMetrics(*delta.metrics) if delta.metrics is not None else None
        return RequestOutput(self.request_id, self.prompt_token_ids, [], True, self.prompt, None, metrics,
                             _embedding(delta.embedding))


def _embedding(data: bytes | None):
    if data is None:
        return None
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.float32)


class OutputProcessor:
    """The open requests of one client, by id: register each with `add`, then `apply` its deltas in order.

    `stop_sequence(request_id, index)` and `abort(request_id)` reach the core: the first when a stop string
    ends one sequence of a request whose others go on, the second when it ends the request's last one."""

    def __init__(self, tokenizer: Tokenizer, stop_sequence: Callable[[str, int], None],
                 abort: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.texts = _TokenTexts(tokenizer)
        self.stop_sequence, self.abort = stop_sequence, abort
        self._requests: dict[str, _Request] = {}

    def add(self, request_id: str, prompt_token_ids: list[int], prompt: str | None,
            params: SamplingParams | PoolingParams) -> None:
        if isinstance(params, PoolingParams):
            self._requests[request_id] = _Pooling(request_id, prompt_token_ids, prompt)
        else:
            self._requests[request_id] = _Request(request_id, prompt_token_ids, prompt, params)

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def apply(self, delta: RequestDelta) -> RequestOutput | None:
        """The output for this delta: None for a request that reports only at its end (best_of > n, a
        search) and is not finished, or that has already finished here."""
        request = self._requests.get(delta.request_id)
        if request is None or (isinstance(request, _Pooling) and not delta.finished):
            return None
        if isinstance(request, _Pooling):
            del self._requests[delta.request_id]
            return request.output(delta)
        if delta.prompt_logprobs is not None:
            request.prompt_logprobs = [None if row is None else self.texts.position(row)
                                       for row in delta.prompt_logprobs]
        if request.params.search is not None:
            news = {d.index: self._search_result(request, d) for d in delta.sequences}
        else:
            news = {d.index: self._apply(request, d) for d in delta.sequences}
        finished = delta.finished or request.all_stopped
        if finished:
            del self._requests[delta.request_id]
            if not delta.finished:  # stop strings ended every sequence: the core need not go on
                self.abort(delta.request_id)
        elif not request.streams or not any(new.token_ids or new.text for new in news.values()):
            return None  # nothing to report yet (a sequence stopped here, reported again by the core)
        return request.output(delta, news, finished)

    def apply_all(self, deltas: list[RequestDelta]) -> list[RequestOutput]:
        return [output for output in map(self.apply, deltas) if output is not None]

    def _apply(self, request: _Request, delta: SequenceDelta) -> _New:
        sequence = request.sequences.get(delta.index)
        if sequence is None:
            sequence = request.sequences[delta.index] = request.new_sequence(delta.index, self.tokenizer)
        going = sequence.finish_reason is None
        new = sequence.apply(delta, self.texts)
        if going and sequence.finish_reason is not None and delta.finish_reason is None \
                and not request.all_stopped:
            self.stop_sequence(request.request_id, delta.index)  # the others go on
        return new

    def _search_result(self, request: _Request, delta: SequenceDelta) -> _New:
        """A search's result comes once, whole; its text is decoded as one."""
        text = self.tokenizer.decode(delta.token_ids, skip_special_tokens=request.params.skip_special_tokens)
        sequence = request.new_sequence(delta.index, self.tokenizer)
        sequence.text, sequence.token_ids = text, list(delta.token_ids)
        sequence.cumulative_logprob = delta.cumulative_logprob or 0.0
        sequence.finish_reason, sequence.stop_reason = delta.finish_reason, delta.stop_reason
        request.sequences[delta.index] = sequence
        return _New(None, text, list(delta.token_ids))
