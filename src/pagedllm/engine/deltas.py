"""What the engine core hands its clients each step: per request, only what is new, as token ids.

A step never copies a request's history: per sequence the token ids it added, their logprob rows
where the request reports or ranks by logprobs, and the finish reason once it ends. Text is the
client's work (engine/output_processor.py: detokenisation, stop strings, logprob texts, best_of), so
it overlaps the core's next step. These are msgspec structs so that the same objects go through a
socket (engine/core_client.py) as msgpack arrays, or stay in the process (LLMEngine.step) untouched.
"""

from __future__ import annotations

import msgspec

# One position's logprobs: the chosen token first, then the top-N, each (token id, logprob, rank).
LogprobRow = list[tuple[int, float, int]]


class SequenceDelta(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What one sequence (one of a request's n / best_of samples) gained this step."""

    index: int
    token_ids: list[int]
    logprobs: list[LogprobRow] | None = None  # one row per new token: reported logprobs, or best_of's ranking
    finish_reason: str | None = None
    stop_reason: int | None = None  # the stop token id that ended it
    ends_with_stop_token: bool = False  # the last token is EOS or a stop token id: its text is not output
    cumulative_logprob: float | None = None  # a search's result (a sampled sequence's is the sum of its rows)


class RequestDelta(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    sequences: list[SequenceDelta]
    finished: bool = False
    # (arrival, first token, finish, preemptions): time.monotonic() seconds, comparable across processes
    metrics: tuple[float, float | None, float | None, int] | None = None
    prompt_logprobs: list[LogprobRow | None] | None = None  # once, in the first delta after the prompt
    embedding: bytes | None = None  # float32, native byte order: a finished request with `pooling`
