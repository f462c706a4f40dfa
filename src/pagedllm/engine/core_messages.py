"""The messages between an engine core's process and its client, as msgspec structs (msgpack on the wire).

Client → core: AddRequest, Abort, StopSequence (a stop string found by the client), Call (a named utility:
probes, snapshot, LoRA), Shutdown.
Core → client: StepOutputs (each step's deltas, and the stats now and then), Reply (to an AddRequest or
a Call). Nothing on the wire is pickled, so a core could listen on another host's TCP socket.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

from ..pooling_params import PoolingParams
from ..sampling_params import SamplingParams
from .deltas import RequestDelta
from .outputs import EngineStats


class EngineInfo(msgspec.Struct, tag=True, array_like=True, frozen=True):
    """What a front end needs to know of the model the core serves (it loads no weights itself)."""

    model_path: str
    max_model_len: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    block_size: int
    lora_enabled: bool
    adapters: dict[str, int]  # LoRA adapters loaded at start, name → rank


class AddRequest(msgspec.Struct, tag=True, array_like=True):
    call_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams | None  # None for a pooling request
    lora: str | None = None
    pooling: PoolingParams | None = None  # an embedding request (apart: msgspec unions hold one object type)


class Abort(msgspec.Struct, tag=True, array_like=True):
    request_ids: list[str]


class StopSequence(msgspec.Struct, tag=True, array_like=True):
    """The client found a stop string in sequence `index` of a request whose other sequences go on."""

    request_id: str
    index: int


class Call(msgspec.Struct, tag=True, array_like=True):
    call_id: int
    method: str  # one of EngineCore.UTILITIES
    args: list[Any]


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


class ErrorInfo(msgspec.Struct, tag=True, array_like=True):
    kind: str  # the exception class the client raises (engine/core_client.py: ERROR_KINDS)
    message: str
    param: str | None = None


class StepOutputs(msgspec.Struct, tag=True, array_like=True, gc=False):
    deltas: list[RequestDelta]
    stats: EngineStats | None = None


class Reply(msgspec.Struct, tag=True, array_like=True):
    call_id: int
    result: Any = None
    error: ErrorInfo | None = None


ClientMessage = Union[AddRequest, Abort, StopSequence, Call, Shutdown]
CoreMessage = Union[StepOutputs, Reply]
