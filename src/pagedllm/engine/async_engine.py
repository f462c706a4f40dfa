"""AsyncLLMEngine: the engine's step loop on its own thread, fed and read from asyncio.

Everything that touches the engine runs on that thread: an add or an abort is a command put on
a queue, and outputs go back to each request's asyncio queue through its event loop. Torch
releases the GIL inside its kernels, so the event loop keeps serving HTTP while a step runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

from ..errors import PagedLLMError
from ..sampling_params import SamplingParams
from .llm_engine import LLMEngine, Prompt
from .outputs import EngineStats, RequestOutput

log = logging.getLogger(__name__)
T = TypeVar("T")


class QueueFullError(PagedLLMError):
    """The waiting queue is at its bound; the request was not taken."""


class EngineDeadError(PagedLLMError):
    """The engine loop stopped after an unexpected error."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_waiting_requests: int = 256,
                 on_finished: Callable[[RequestOutput], None] | None = None):
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.on_finished = on_finished  # called on the engine thread for each finished request
        self.stats: EngineStats = engine.stats()  # refreshed by the engine thread after every step
        self.dead: BaseException | None = None
        self.num_aborted = 0  # requests aborted while still open (their client went away)
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="pagedllm-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)

    async def add(self, request_id: str, prompt: Prompt, params: SamplingParams,
                  lora: str | None = None) -> AsyncIterator[RequestOutput]:
        """Admit a request (errors are raised here) and return the iterator of its outputs. Leaving
        that iterator early (a client that went away) aborts the request and frees its blocks; a
        caller that never iterates it must call abort()."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        admitted: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._submit(lambda: self._add(request_id, prompt, params, lora, stream, admitted))
        await asyncio.wrap_future(admitted)
        return self._outputs(request_id, stream)

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams,
                       lora: str | None = None) -> AsyncIterator[RequestOutput]:
        async for output in await self.add(request_id, prompt, params, lora):
            yield output

    async def _outputs(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                output = await stream.outputs.get()
                if isinstance(output, BaseException):
                    raise output
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._submit(lambda: self._abort(request_id))

    async def call(self, work: Callable[[LLMEngine], T]) -> T:
        """Run `work(engine)` on the engine thread between two steps (probes on the serving model)."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def command() -> None:
            try:
                done.set_result(work(self.engine))
            except Exception as exc:  # the caller's error, raised where it awaits
                done.set_exception(exc)

        self._submit(command)
        return await asyncio.wrap_future(done)

    # -- the engine thread --------------------------------------------------------------------
    def _submit(self, command: Callable[[], None]) -> None:
        if self.dead is not None:
            raise EngineDeadError(f"the engine stopped: {self.dead}")
        self._commands.put(command)
        self._wake.set()

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_commands()
                if not self.engine.has_unfinished():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                for output in self.engine.step():
                    self._deliver(output)
                self.stats = self.engine.stats()
        except Exception as exc:  # a bug: fail every open request instead of hanging them
            log.exception("engine loop failed")
            self.dead = exc
            for request_id in list(self._streams):
                self._put(request_id, EngineDeadError("the engine failed; see the server log"))

    def _drain_commands(self) -> None:
        ran = False
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            command()
            ran = True
        if ran:
            self.stats = self.engine.stats()

    def _add(self, request_id: str, prompt: Prompt, params: SamplingParams, lora: str | None, stream: _Stream,
             admitted: concurrent.futures.Future) -> None:
        if len(self.engine.scheduler.waiting) >= self.max_waiting_requests:
            admitted.set_exception(QueueFullError(f"the waiting queue is full ({self.max_waiting_requests} "
                                                  f"requests); try again later"))
            return
        try:
            self.engine.add_request(request_id, prompt, params, lora=lora)
        except (PagedLLMError, ValueError) as exc:
            admitted.set_exception(exc)
            return
        self._streams[request_id] = stream
        admitted.set_result(None)

    def _abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        if self._streams.pop(request_id, None) is not None:
            self.num_aborted += 1

    def _deliver(self, output: RequestOutput) -> None:
        self._put(output.request_id, output)
        if output.finished:
            self._streams.pop(output.request_id, None)
            if self.on_finished is not None:
                self.on_finished(output)

    def _put(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.outputs.put_nowait, item)
