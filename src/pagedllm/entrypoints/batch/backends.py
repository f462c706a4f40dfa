"""Where a batch job's replicas live: local processes, or actors on a Ray cluster.

Both backends offer the coordinator the same three calls: `submit(worker, tasks)`, `poll(timeout)`
→ finished records, and `in_flight[worker]`. Each submitted task comes back as exactly one record.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import queue
import time
from abc import ABC, abstractmethod
from typing import Any

from ...config import EngineConfig
from ...errors import PagedLLMError
from .rows import BatchTask
from .worker import STOP, ReplicaPlacement, ReplicaWorker, run_local_worker

Records = list[dict[str, Any]]


class BatchError(PagedLLMError):
    """The job cannot go on (a worker died, a backend is missing); what is written stays written."""


class Backend(ABC):
    def __init__(self, num_workers: int):
        self.in_flight = [0] * num_workers

    @abstractmethod
    def start(self) -> None:
        """Start every replica and wait until each has loaded its model."""

    def submit(self, worker: int, tasks: list[BatchTask]) -> None:
        self.in_flight[worker] += len(tasks)
        self._send(worker, tasks)

    def poll(self, timeout: float) -> Records:
        records: Records = []
        for worker, finished in self._receive(timeout):
            self.in_flight[worker] -= len(finished)
            records.extend(finished)
        return records

    @abstractmethod
    def _send(self, worker: int, tasks: list[BatchTask]) -> None: ...

    @abstractmethod
    def _receive(self, timeout: float) -> list[tuple[int, Records]]: ...

    @abstractmethod
    def close(self) -> None: ...


def _replica_config(config: EngineConfig, placement: ReplicaPlacement) -> EngineConfig:
    return dataclasses.replace(config, device=placement.device, tensor_parallel_devices=placement.group)


class LocalBackend(Backend):
    """One spawned process per replica; rows go down a queue per worker, records come back on one."""

    def __init__(self, config: EngineConfig, placements: list[ReplicaPlacement]):
        super().__init__(len(placements))
        context = multiprocessing.get_context("spawn")  # no inherited torch threads or locks
        self._outbox = context.Queue()
        self._inboxes = [context.Queue() for _ in placements]
        daemon = config.tensor_parallel_size == 1  # a tensor-parallel replica starts rank processes: not as a daemon
        self._processes = [
            context.Process(target=run_local_worker, name=f"pagedllm-worker-{i}", daemon=daemon,
                            args=(i, _replica_config(config, p), p, self._inboxes[i], self._outbox))
            for i, p in enumerate(placements)]

    def start(self) -> None:
        for process in self._processes:
            process.start()
        waiting = set(range(len(self._processes)))
        while waiting:
            message = self._next_message(timeout=1.0)
            if message is None:
                continue
            kind, worker, payload = message
            if kind == "error":
                raise BatchError(f"worker {worker} could not start: {payload}")
            waiting.discard(worker)

    def _send(self, worker: int, tasks: list[BatchTask]) -> None:
        self._inboxes[worker].put(tasks)

    def _receive(self, timeout: float) -> list[tuple[int, Records]]:
        received = []
        message = self._next_message(timeout)
        while message is not None:
            _, worker, records = message
            received.append((worker, records))
            message = self._next_message(timeout=0)
        return received

    def _next_message(self, timeout: float) -> tuple[str, int, Any] | None:
        try:
            return self._outbox.get(timeout=timeout) if timeout else self._outbox.get_nowait()
        except queue.Empty:
            self._check_alive()
            return None

    def _check_alive(self) -> None:
        for i, process in enumerate(self._processes):
            if process.exitcode is not None:
                raise BatchError(f"worker {i} exited with code {process.exitcode}; the rows written so far are kept "
                                 "and running the same command again resumes the job")

    def close(self) -> None:
        for inbox, process in zip(self._inboxes, self._processes):
            if process.is_alive():
                inbox.put(STOP)
        deadline = time.monotonic() + 5
        for process in self._processes:
            if process.pid is not None:
                process.join(max(0.0, deadline - time.monotonic()))
                if process.is_alive():
                    process.kill()
                    process.join()


class RayReplica:
    """A Ray actor around a ReplicaWorker: each `work` call hands over new rows and returns the
    records finished while it ran (at least one step, at most `budget_s` of steps)."""

    def __init__(self, config: EngineConfig, placement: ReplicaPlacement):
        placement.apply()
        self._worker = ReplicaWorker(config)

    def ready(self) -> bool:
        return True

    def work(self, tasks: list[BatchTask], budget_s: float = 0.25) -> Records:
        records = self._worker.add(tasks)
        deadline = time.monotonic() + budget_s
        while self._worker.busy and not records and time.monotonic() < deadline:
            records += self._worker.step()
        return records


class RayBackend(Backend):
    """One actor per replica on a Ray cluster (an existing one at `address`, or a local one)."""

    def __init__(self, config: EngineConfig, placements: list[ReplicaPlacement], address: str | None):
        super().__init__(len(placements))
        try:
            import ray
        except ImportError:
            raise BatchError("--backend ray needs Ray: pip install 'ray>=2.9'") from None
        self._ray = ray
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            local = {"num_cpus": sum(p.threads for p in placements)} if address is None else {}
            ray.init(address=address, include_dashboard=False, log_to_driver=False, **local)
        actor = ray.remote(RayReplica)
        self._actors = []
        for placement in placements:
            gpu = placement.device.startswith("cuda")
            # Ray places actors and hides the other GPUs from each: an actor's GPU is always "cuda".
            placement = dataclasses.replace(placement, device="cuda" if gpu else placement.device, cpus=())
            self._actors.append(actor.options(num_cpus=placement.threads, num_gpus=int(gpu))
                                .remote(_replica_config(config, placement), placement))
        self._buffers: list[list[BatchTask]] = [[] for _ in placements]
        self._calls: dict[Any, int] = {}  # pending work() call -> worker

    def start(self) -> None:
        try:
            self._ray.get([a.ready.remote() for a in self._actors])
        except self._ray.exceptions.RayError as exc:
            raise BatchError(f"a Ray replica could not start: {_ray_reason(exc)}") from None

    def _send(self, worker: int, tasks: list[BatchTask]) -> None:
        self._buffers[worker].extend(tasks)

    def _receive(self, timeout: float) -> list[tuple[int, Records]]:
        busy = set(self._calls.values())
        for worker, actor in enumerate(self._actors):
            if worker not in busy and (self._buffers[worker] or self.in_flight[worker]):
                self._calls[actor.work.remote(self._buffers[worker])] = worker
                self._buffers[worker] = []
        if not self._calls:
            return []
        done, _ = self._ray.wait(list(self._calls), num_returns=1, timeout=timeout)
        if done:
            done, _ = self._ray.wait(list(self._calls), num_returns=len(self._calls), timeout=0)
        try:
            return [(self._calls.pop(ref), self._ray.get(ref)) for ref in done]
        except self._ray.exceptions.RayError as exc:
            raise BatchError(f"a Ray replica failed: {_ray_reason(exc)}; the rows written so far are kept and "
                             "running the same command again resumes the job") from None

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        if self._started_ray:
            self._ray.shutdown()


def _ray_reason(exc: Exception) -> str:
    cause = getattr(exc, "cause", None)
    return str(cause) if cause is not None else str(exc).strip().splitlines()[-1]
