"""EngineCore: scheduler, model runner and KV cache stepping in the main thread of a process of its own.

It takes requests as token ids with their parameters and sends back, each step, per request only what
is new, as token ids (engine/deltas.py). Front ends reach it through an AsyncEngineClient
(engine/core_client.py), which owns tokenisation and turns the deltas into text (engine/output_processor.py). Its loop (`serve`), in order:

1. take every message waiting (admissions, aborts, utility calls), blocking only when there is no work;
2. step once and send the step's deltas (and, at most every STATS_INTERVAL_S, the engine's stats).

Why a process and its main thread: kernels driven from a second thread of a process whose main thread
also ran kernels lost half their speed (kernels/openmp.py), and the front end's Python (HTTP, JSON,
chat templates) no longer shares a GIL with the step.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from ..errors import PagedLLMError
from .core_messages import (Abort, AddRequest, Call, ClientMessage, EngineInfo, ErrorInfo, Reply, Shutdown,
                            StepOutputs, StopSequence)
from .deltas import RequestDelta

log = logging.getLogger(__name__)
STATS_INTERVAL_S = 0.1
IDLE_POLL_MS = 1000
MAX_PROBE_JOBS = 4  # each holds its layers' hidden states until it answers


class QueueFullError(PagedLLMError):
    """The waiting queue is at its bound; the request was not taken."""


class ProbeJob:
    """A probe request under way: its slices (tools/inspect.py), each run under the request's adapter."""

    def __init__(self, slices, lora: str | None):
        self.slices, self.lora = slices, lora

    def advance(self, engine) -> dict | None:
        """Run one slice; the probes' JSON once the last is done."""
        with engine.adapted(self.lora):
            try:
                next(self.slices)
            except StopIteration as done:
                return done.value.as_json()
        return None


class EngineCore:
    UTILITIES = frozenset({"snapshot", "probe", "load_lora", "unload_lora"})

    def __init__(self, engine, max_waiting_requests: int = 256):
        self.engine = engine  # an LLMEngine
        self.max_waiting_requests = max_waiting_requests
        self.probes: dict[int, ProbeJob] = {}  # by the call that asked, oldest first

    def info(self) -> EngineInfo:
        engine, shape = self.engine, self.engine.model.config
        adapters = {a.name: a.rank for a in engine.loras.adapters.values()} if engine.loras is not None else {}
        return EngineInfo(str(engine.source.path), engine.max_model_len, shape.vocab_size, shape.hidden_size,
                          shape.num_hidden_layers, shape.num_attention_heads, engine.kv_spec.block_size,
                          engine.loras is not None, adapters)

    def add(self, message: AddRequest) -> None:
        """Admit a request or raise why not (the client turns the error into its answer)."""
        if len(self.engine.scheduler.waiting) >= self.max_waiting_requests:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting_requests} requests); try again later")
        self.engine.add_request(message.request_id, {"prompt_token_ids": message.prompt_token_ids},
                                message.pooling or message.params, lora=message.lora)

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.engine.abort(request_id)

    def has_work(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> list[RequestDelta]:
        return self.engine.step_deltas()

    # -- utility calls: between two steps, on the serving model ---------------------------------
    def snapshot(self) -> dict:
        return self.engine.snapshot()

    def probe(self, ids: list[int], layers: list[int] | None, top_k: int, attention: list[str],
              lora: str | None) -> "ProbeJob":
        """Probes on a prompt on a KV cache of their own (the requests being served are untouched), checked
        now and run in slices between engine steps (ProbeJob.advance)."""
        from ..tools.inspect import check_probe_budget, inspect_slices

        if len(self.probes) >= MAX_PROBE_JOBS:
            raise QueueFullError(f"{MAX_PROBE_JOBS} probes are already running; try again later")
        check_probe_budget(self.engine.model.config, len(ids), layers, attention)
        if lora is not None:
            self.engine.lora_adapter(lora)  # an unknown adapter is refused now, not at the first slice
        return ProbeJob(inspect_slices(self.engine.model, ids, layers, top_k, self.engine.kv_spec.block_size,
                                       attention), lora)

    def load_lora(self, name: str, path: str) -> int:
        """Load an adapter from this machine's files; its rank."""
        return self.engine.load_lora(name, path).rank

    def unload_lora(self, name: str) -> None:
        self.engine.unload_lora(name)


def error_info(exc: BaseException) -> ErrorInfo:
    """An error for the client to raise again: its kind by class name, its message and the field at fault.
    Anything but a refusal (PagedLLMError, ValueError) is a bug: logged here, an InternalError there."""
    if not isinstance(exc, (PagedLLMError, ValueError)):
        log.exception("engine core: unexpected error")
        return ErrorInfo("InternalError", f"the engine core failed: {type(exc).__name__}; see the server log")
    return ErrorInfo(type(exc).__name__, str(exc), getattr(exc, "param", None))


class _Loop:
    """The core's side of the sockets: one PULL for what the client sends, one PUSH for what goes back."""

    def __init__(self, core: EngineCore, input_address: str, output_address: str):
        self.core = core
        context = zmq.Context()
        self.inputs = context.socket(zmq.PULL)
        self.inputs.connect(input_address)
        self.outputs = context.socket(zmq.PUSH)
        self.outputs.setsockopt(zmq.SNDHWM, 0)  # never drop or block on what a client has not read yet
        self.outputs.connect(output_address)
        self.decoder = msgspec.msgpack.Decoder(ClientMessage)
        self.encoder = msgspec.msgpack.Encoder()
        self.next_stats = 0.0
        self.running = True

    def serve(self) -> None:
        while self.running:
            self._take_messages(block=not (self.core.has_work() or self.core.probes))
            if self.running and self.core.has_work():
                deltas = self.core.step()  # the last step of a busy spell always reports the idle engine
                self._send(StepOutputs(deltas, self._stats_due(force=not self.core.has_work())))
            if self.running and self.core.probes:
                self._advance_probe()

    def _advance_probe(self) -> None:
        """One slice of the oldest probe between two steps: a long probe no longer stalls the streams."""
        call_id, job = next(iter(self.core.probes.items()))
        try:
            result = job.advance(self.core.engine)
        except Exception as exc:
            del self.core.probes[call_id]
            self._send(Reply(call_id, error=error_info(exc)))
            return
        if result is not None:
            del self.core.probes[call_id]
            self._send(Reply(call_id, result))

    def _take_messages(self, block: bool) -> None:
        if not self.inputs.poll(IDLE_POLL_MS if block else 0):
            return
        while self.running:
            try:
                frame = self.inputs.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._handle(self.decoder.decode(frame))
        if not self.core.has_work():  # admissions and aborts change the stats a scrape reads
            self._send(StepOutputs([], self._stats_due(force=True)))

    def _handle(self, message: ClientMessage) -> None:
        if isinstance(message, AddRequest):
            self._reply(message.call_id, lambda: self.core.add(message))
        elif isinstance(message, Abort):
            self.core.abort(message.request_ids)
        elif isinstance(message, StopSequence):
            self.core.engine.stop_sequence(message.request_id, message.index)
        elif isinstance(message, Call):
            if message.method not in EngineCore.UTILITIES:
                self._send(Reply(message.call_id, error=ErrorInfo("PagedLLMError", f"no utility {message.method!r}")))
            elif message.method == "probe":  # checked now, answered when its last slice is done
                self._start_probe(message)
            else:
                self._reply(message.call_id, lambda: getattr(self.core, message.method)(*message.args))
        elif isinstance(message, Shutdown):
            self.running = False

    def _start_probe(self, message: Call) -> None:
        try:
            self.core.probes[message.call_id] = self.core.probe(*message.args)
        except Exception as exc:
            self._send(Reply(message.call_id, error=error_info(exc)))

    def _reply(self, call_id: int, work: Callable[[], Any]) -> None:
        try:
            result = work()
        except Exception as exc:  # the caller's error (a refused request, a bad adapter): it travels back
            self._send(Reply(call_id, error=error_info(exc)))
            return
        self._send(Reply(call_id, result))

    def _stats_due(self, force: bool = False):
        now = time.monotonic()
        if not force and now < self.next_stats:
            return None
        self.next_stats = now + STATS_INTERVAL_S
        return self.core.engine.stats()

    def _send(self, message) -> None:
        self.outputs.send(self.encoder.encode(message), copy=False)


def run_engine_core(config, input_address: str, output_address: str, ready, make_proposer,
                    max_waiting_requests: int, cpus: tuple[int, ...] | None = None) -> None:
    """A core process's life: keep to `cpus` (a data-parallel share), load the engine, say it is ready (its
    EngineInfo, or why it could not start) through the `ready` pipe, then serve until told to stop or until
    its client's process is gone."""
    import torch

    from .llm_engine import LLMEngine
    from .parallel import exit_with_parent

    exit_with_parent()
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(len(cpus))
    try:
        core = EngineCore(LLMEngine(config, make_proposer=make_proposer, whole_outputs=False),
                          max_waiting_requests)
    except Exception as exc:  # a bad model file or flag: the client reports it and does not retry
        ready.send_bytes(msgspec.msgpack.encode(error_info(exc)))
        return
    ready.send_bytes(msgspec.msgpack.encode(core.info()))
    ready.close()
    log.info("engine core %d serving", os.getpid())
    _Loop(core, input_address, output_address).serve()
