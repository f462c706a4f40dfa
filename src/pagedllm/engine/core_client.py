"""AsyncEngineClient: the front end's side of the engine cores, each running in a process of its own.

Every server route goes through it: `add` (admission, then the request's outputs as an async iterator),
`abort`, `call` (probes, the engine snapshot, LoRA load and unload, run between two steps in a core),
`stats`. It owns the tokenizer and turns each request's deltas into outputs (engine/output_processor.py:
detokenisation, stop strings, logprob texts, best_of) as the route reads them, so that work overlaps the
cores' next steps.

Data parallel (`data_parallel_size` N): N cores, each with the whole model and its own KV cache (and its
own CPUs on the CPU). A request goes to the core whose prefix cache most likely holds the longest
beginning of its prompt, counted in whole blocks from what was sent to each core (engine/prefix_router.py),
else to the core with the fewest open requests (SGLang's cache-aware routing, sized down).

A core that dies (a crash, SIGKILL, out of memory) never hangs a client: its process sentinel wakes the
event loop at once, its open requests and calls get EngineDeadError, and a fresh core takes its place,
up to `max_restarts` times per core. `dead` is set (the server's /health is 503) while no core serves.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, fields
from typing import Any

import msgspec
import zmq

from ..config import EngineConfig
from ..errors import PagedLLMError
from ..lora import LoRAError
from ..pooling_params import PoolingParams
from ..models.loaders import resolve_model
from ..sampling_params import SamplingParams
from ..tokenizer import Tokenizer, load_tokenizer
from .core import QueueFullError, run_engine_core
from .core_messages import (Abort, AddRequest, Call, CoreMessage, EngineInfo, ErrorInfo, Reply, Shutdown,
                            StepOutputs, StopSequence)
from .deltas import RequestDelta
from .output_processor import OutputProcessor
from .outputs import EngineStats, RequestOutput
from .prefix_router import PrefixIndex, block_hashes
from .prompt import RequestError, prompt_ids

log = logging.getLogger(__name__)
# Plain ints: the flags as pyzmq's enums cost enum arithmetic on every message.
_FD, _EVENTS, _POLLIN, _NOBLOCK = int(zmq.FD), int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)
START_TIMEOUT_S = 600.0  # loading a large model from a cold disk
MAX_RESTARTS = 3


class EngineDeadError(PagedLLMError):
    """An engine core stopped (it is being restarted, or gave up); the request is lost."""


class EngineStartError(PagedLLMError):
    """An engine core could not start (a bad model file or setting); the message says why."""


def _probe_error(message: str, param: str | None) -> Exception:
    from ..tools.inspect import ProbeError

    return ProbeError(message)


# The core's error classes, by name, as the client raises them again.
ERROR_KINDS: dict[str, Callable[[str, str | None], Exception]] = {
    "QueueFullError": lambda m, p: QueueFullError(m),
    "LoRAError": lambda m, p: LoRAError(m),
    "ProbeError": _probe_error,
    "InternalError": lambda m, p: RuntimeError(m),  # a bug in the core: the server answers 500
}


def raise_error(error: ErrorInfo) -> Exception:
    make = ERROR_KINDS.get(error.kind)
    return make(error.message, error.param) if make is not None else RequestError(error.message, error.param)


def plan_cpus(cores: int, device: str) -> list[tuple[int, ...] | None]:
    """Each core's CPUs: this process's CPUs in `cores` disjoint runs on the CPU; no pinning for one core
    or on a GPU."""
    if cores == 1 or device != "cpu":
        return [None] * cores
    available = sorted(os.sched_getaffinity(0))
    if len(available) < cores:
        raise EngineStartError(f"--data-parallel-size {cores} needs at least {cores} CPUs; this process has "
                               f"{len(available)}")
    share = len(available) // cores
    return [tuple(available[i * share:(i + 1) * share]) for i in range(cores)]


def _add_request(call_id: int, request_id: str, ids: list[int], params: SamplingParams | PoolingParams,
                 lora: str | None) -> AddRequest:
    if isinstance(params, PoolingParams):
        return AddRequest(call_id, request_id, ids, None, lora, params)
    return AddRequest(call_id, request_id, ids, params, lora)


@dataclass
class _Stream:
    deltas: asyncio.Queue = field(default_factory=asyncio.Queue)  # RequestDelta, or the error that ended it


class _CoreProcess:
    """One life of an engine core: its process and the two sockets to it (new ones for each life, so
    nothing sent to a dead core reaches its successor)."""

    def __init__(self, config: EngineConfig, make_proposer, max_waiting_requests: int, context: zmq.Context,
                 cpus: tuple[int, ...] | None):
        self.folder = tempfile.mkdtemp(prefix="pagedllm-core-")  # ipc sockets: only this user may connect
        self.inputs = context.socket(zmq.PUSH)
        self.inputs.setsockopt(zmq.SNDHWM, 0)
        self.inputs.setsockopt(zmq.LINGER, 0)
        self.inputs.bind(f"ipc://{self.folder}/in")
        self.outputs = context.socket(zmq.PULL)
        self.outputs.setsockopt(zmq.LINGER, 0)
        self.outputs.bind(f"ipc://{self.folder}/out")
        spawn = multiprocessing.get_context("spawn")
        self.ready, child_end = spawn.Pipe(duplex=False)
        self.process = spawn.Process(target=run_engine_core, name="pagedllm-engine-core", daemon=True,
                                     args=(config, f"ipc://{self.folder}/in", f"ipc://{self.folder}/out", child_end,
                                           make_proposer, max_waiting_requests, cpus))
        self.process.start()
        child_end.close()

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> EngineInfo:
        """Block until the core has loaded its model: its EngineInfo, or EngineStartError."""
        try:
            if not self.ready.poll(timeout):
                raise EngineStartError(f"the engine core did not start within {timeout:.0f} s")
            answer = msgspec.msgpack.decode(self.ready.recv_bytes(), type=EngineInfo | ErrorInfo)
        except EOFError:
            raise EngineStartError(f"the engine core exited while starting (exit code "
                                   f"{self.process.join(5) or self.process.exitcode})") from None
        if isinstance(answer, ErrorInfo):
            raise EngineStartError(answer.message)
        return answer

    def close(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)
        self.inputs.close()
        self.outputs.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class _Core:
    """One data-parallel place for a core, across its restarts."""

    index: int
    cpus: tuple[int, ...] | None
    process: _CoreProcess
    prefixes: PrefixIndex
    restarts_left: int
    stats: EngineStats = field(default_factory=lambda: EngineStats(0, 0, 0, 0, 0, 0.0))
    open: set[str] = field(default_factory=set)  # its requests not finished yet
    calls: dict[int, asyncio.Future] = field(default_factory=dict)  # admissions and calls awaiting its reply
    dead: EngineDeadError | None = None
    restarting: bool = False


class AsyncEngineClient:
    def __init__(self, config: EngineConfig, max_waiting_requests: int = 256, make_proposer=None,
                 on_finished: Callable[[RequestOutput], None] | None = None, max_restarts: int = MAX_RESTARTS,
                 data_parallel_size: int = 1):
        """Start the engine cores (all loading at once) and wait for them (EngineStartError if one cannot
        start). `on_finished` is called for each finished request as its route reads it."""
        if not isinstance(data_parallel_size, int) or data_parallel_size < 1:
            raise EngineStartError(f"data_parallel_size must be a positive integer, got {data_parallel_size!r}")
        self.config, self.make_proposer, self.max_waiting_requests = config, make_proposer, max_waiting_requests
        self.on_finished = on_finished
        self.tokenizer: Tokenizer = load_tokenizer(resolve_model(config.model))
        self.num_aborted = 0  # requests aborted while still open (their client went away)
        self._context = zmq.Context()  # plain sockets: the event loop watches their file descriptors
        self._ids = itertools.count()
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(CoreMessage)
        self._streams: dict[str, _Stream] = {}
        self._where: dict[str, _Core] = {}  # each open request's core
        self._processor = OutputProcessor(self.tokenizer, self._stop_sequence, self._finished_here)
        self._closing = False
        cpus = plan_cpus(data_parallel_size, config.device)
        processes = [self._start_process(c) for c in cpus]
        try:
            infos = [process.wait_ready() for process in processes]
        except EngineStartError:
            for process in processes:
                process.close()
            raise
        self.info: EngineInfo = infos[0]
        self.adapters: dict[str, int] = dict(self.info.adapters)  # LoRA adapters loaded now, name → rank
        self.cores = [_Core(i, c, p, PrefixIndex(), max_restarts)
                      for i, (c, p) in enumerate(zip(cpus, processes))]

    def _start_process(self, cpus: tuple[int, ...] | None) -> _CoreProcess:
        return _CoreProcess(self.config, self.make_proposer, self.max_waiting_requests, self._context, cpus)

    @property
    def dead(self) -> EngineDeadError | None:
        """Why no core serves, while none does."""
        return self.cores[0].dead if all(core.dead is not None for core in self.cores) else None

    @property
    def stats(self) -> EngineStats:
        """The cores' stats together: counts and rates added, the prefix-cache hit rate averaged."""
        live = [core.stats for core in self.cores if core.dead is None] or [self.cores[0].stats]
        summed = {f.name: sum(getattr(s, f.name) for s in live) for f in fields(EngineStats)}
        summed["prefix_cache_hit_rate"] /= len(live)
        return EngineStats(**summed)

    # -- life ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Begin reading the cores' outputs and watching their processes (inside the serving event loop)."""
        for core in self.cores:
            self._watch(core)

    async def shutdown(self) -> None:
        self._closing = True
        for core in self.cores:
            self._unwatch(core.process)
            if core.process.process.is_alive():
                core.process.inputs.send(self._encoder.encode(Shutdown()))
        for core in self.cores:
            await asyncio.to_thread(core.process.process.join, 10)
            core.process.close()
        self._context.term()

    def _watch(self, core: _Core) -> None:
        """Read the core's outputs as they come and notice its end, both from the event loop."""
        loop = asyncio.get_running_loop()
        loop.add_reader(core.process.process.sentinel, self._on_core_exit, core, core.process)
        loop.add_reader(core.process.outputs.getsockopt(_FD), self._read, core)
        self._read(core)  # what came before the loop watched

    @staticmethod
    def _unwatch(process: _CoreProcess) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(process.process.sentinel)
        if not process.outputs.closed:
            loop.remove_reader(process.outputs.getsockopt(_FD))

    def _on_core_exit(self, core: _Core, process: _CoreProcess) -> None:
        self._unwatch(process)
        if self._closing or process is not core.process:
            return
        process.process.join(0)
        core.dead = EngineDeadError(f"the engine core stopped (exit code {process.process.exitcode})")
        log.error("core %d: %s; %d restart(s) left", core.index, core.dead, core.restarts_left)
        self._fail_open_requests(core)
        process.close()
        if core.restarts_left > 0:
            core.restarts_left -= 1
            core.restarting = True
            asyncio.create_task(self._restart(core))

    async def _restart(self, core: _Core) -> None:
        try:
            process = self._start_process(core.cpus)
            await asyncio.to_thread(process.wait_ready)
        except Exception as exc:
            log.error("core %d could not be restarted: %s", core.index, exc)
            return
        finally:
            core.restarting = False
        core.process, core.dead, core.prefixes = process, None, PrefixIndex()
        self._watch(core)
        log.warning("core %d: a fresh engine core is serving", core.index)

    def _fail_open_requests(self, core: _Core) -> None:
        for request_id in core.open:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.deltas.put_nowait(core.dead)
            self._processor.forget(request_id)
            self._where.pop(request_id, None)
        core.open.clear()
        for future in core.calls.values():
            if not future.done():
                future.set_exception(core.dead)
        core.calls.clear()

    # -- what the cores send ---------------------------------------------------------------------
    def _read(self, core: _Core) -> None:
        """Take every message waiting (a ZeroMQ descriptor signals edges: drain until none is left). With
        pyzmq's asyncio sockets instead, half of the front end's CPU time in a stream went to their event
        machinery (py-spy), time taken from the core's threads on a 2-core machine."""
        socket = core.process.outputs
        while socket.getsockopt(_EVENTS) & _POLLIN:
            message = self._decoder.decode(socket.recv(_NOBLOCK, copy=False))
            if isinstance(message, StepOutputs):
                self._deliver(core, message.deltas)
                if message.stats is not None:
                    core.stats = message.stats
            else:
                self._answer(core, message)

    def _deliver(self, core: _Core, deltas: list[RequestDelta]) -> None:
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is not None:
                stream.deltas.put_nowait(delta)
                if delta.finished:
                    self._close_stream(delta.request_id)

    def _answer(self, core: _Core, reply: Reply) -> None:
        future = core.calls.pop(reply.call_id, None)
        if future is None or future.done():
            return
        if reply.error is not None:
            future.set_exception(raise_error(reply.error))
        else:
            future.set_result(reply.result)

    # -- what front ends ask ----------------------------------------------------------------------
    async def add(self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams | PoolingParams,
                  lora: str | None = None) -> AsyncIterator[RequestOutput]:
        """Admit a request on one core (errors are raised here) and return the iterator of its outputs.
        Leaving that iterator early (a client that went away) aborts the request and frees its blocks; a
        caller that never iterates it must call abort()."""
        text, ids = prompt_ids(prompt, self.tokenizer)
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already in use")
        core, hashes = self._route(ids)
        stream = _Stream()
        self._streams[request_id], self._where[request_id] = stream, core
        core.open.add(request_id)
        self._processor.add(request_id, ids, text, params)
        try:
            await self._ask(core, lambda call_id: _add_request(call_id, request_id, ids, params, lora))
        except BaseException:
            self._close_stream(request_id)
            self._processor.forget(request_id)
            raise
        core.prefixes.record(hashes)
        return self._outputs(request_id, stream)

    def _route(self, ids: list[int]) -> tuple[_Core, list[int]]:
        """The live core with the most of the prompt's leading blocks, then the fewest open requests."""
        live = [core for core in self.cores if core.dead is None]
        if not live:
            raise self._dead_error(self.cores[0])
        hashes = block_hashes(ids, self.info.block_size)
        return max(live, key=lambda core: (core.prefixes.match(hashes), -len(core.open), -core.index)), hashes

    async def generate(self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams | PoolingParams,
                       lora: str | None = None) -> AsyncIterator[RequestOutput]:
        async for output in await self.add(request_id, prompt, params, lora):
            yield output

    async def _outputs(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                delta = await stream.deltas.get()
                if isinstance(delta, BaseException):
                    raise delta
                output = self._processor.apply(delta)
                if output is None:
                    continue
                finished = output.finished
                if finished and self.on_finished is not None:
                    self.on_finished(output)
                yield output
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request at once; its core frees its blocks."""
        self._processor.forget(request_id)
        core = self._where.get(request_id)
        if self._close_stream(request_id):
            self.num_aborted += 1
            if core.dead is None:
                self._send(core, Abort([request_id]))

    def _stop_sequence(self, request_id: str, index: int) -> None:
        """A stop string ended one sequence of a request whose others go on: its core stops computing it."""
        core = self._where.get(request_id)
        if core is not None and core.dead is None:
            self._send(core, StopSequence(request_id, index))

    def _finished_here(self, request_id: str) -> None:
        """Stop strings ended a request before its core did: the core forgets it."""
        core = self._where.get(request_id)
        if self._close_stream(request_id) and core.dead is None:
            self._send(core, Abort([request_id]))

    def _close_stream(self, request_id: str) -> bool:
        core = self._where.pop(request_id, None)
        if core is not None:
            core.open.discard(request_id)
        return self._streams.pop(request_id, None) is not None

    async def call(self, method: str, *args: Any) -> Any:
        """Run one of the cores' utilities (EngineCore.UTILITIES) between two of their steps: LoRA loads and
        unloads on every core, a snapshot of each (core 0's, with all of them under "cores"), a probe on the
        least busy one."""
        live = [core for core in self.cores if core.dead is None]
        if not live:
            raise self._dead_error(self.cores[0])
        if method == "probe":
            live = [min(live, key=lambda core: len(core.open))]
        elif method == "snapshot" and len(self.cores) == 1:
            live = live[:1]
        results = await asyncio.gather(*(self._ask(core, lambda call_id: Call(call_id, method, list(args)))
                                         for core in live))
        if method == "load_lora":
            self.adapters[args[0]] = results[0]
        elif method == "unload_lora":
            self.adapters.pop(args[0], None)
        if method == "snapshot" and len(self.cores) > 1:
            return {**results[0], "cores": results}
        return results[0]

    async def _ask(self, core: _Core, message: Callable[[int], AddRequest | Call]) -> Any:
        if core.dead is not None:
            raise self._dead_error(core)
        call_id = next(self._ids)
        try:
            data = self._encoder.encode(message(call_id))
        except (OverflowError, msgspec.EncodeError) as exc:  # what a body's checks let through must not be a 500
            raise RequestError(f"the request holds a value that cannot be sent to the engine: {exc}") from None
        future = asyncio.get_running_loop().create_future()
        core.calls[call_id] = future
        core.process.inputs.send(data, copy=False)
        return await future

    @staticmethod
    def _dead_error(core: _Core) -> EngineDeadError:
        return EngineDeadError(f"{core.dead}; " + ("a fresh one is starting" if core.restarting else
                                                   "it is not restarted"))

    def _send(self, core: _Core, message) -> None:
        core.process.inputs.send(self._encoder.encode(message), copy=False)
