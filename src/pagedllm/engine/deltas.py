"""What the engine core hands its clients each step: per request, only what is new.

A step never copies a request's history: the token ids, text and logprobs of the positions it
added, the finish reason once it ends. Clients put the pieces together (engine/output_processor.py).
These are msgspec structs so that the same objects go through a socket (engine/core_client.py) as
msgpack arrays, or stay in the process (LLMEngine.step) untouched.
"""

from __future__ import annotations

import msgspec

# One position's logprobs: the chosen token first, then the top-N, each (token id, logprob, rank, its text).
PositionEntries = list[tuple[int, float, int, str | None]]


class CompletionDelta(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What one of a request's completions gained this step."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[PositionEntries] | None = None  # one entry per new token, when asked for
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class RequestDelta(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    completions: list[CompletionDelta]
    finished: bool = False
    # (arrival, first token, finish, preemptions): time.monotonic() seconds, comparable across processes
    metrics: tuple[float, float | None, float | None, int] | None = None
    prompt_logprobs: list[PositionEntries | None] | None = None  # once, in the first delta after the prompt
    embedding: bytes | None = None  # float32, native byte order: a finished request with `pooling`
