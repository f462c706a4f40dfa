"""Tensor parallelism in the engine: one scheduler driving N model workers.

Rank 0 is the engine's process: it schedules, samples and streams as always. Ranks 1..N-1 are
worker processes, each with its slice of the model (pagedllm.distributed) and its own KV pool of
its heads. Every step rank 0 sends the step's batch to the workers (a broadcast over the group), all
ranks run the forward pass together — summing partial products and gathering the vocabulary's
logits — and rank 0 samples. Block and state-slot copies (forks, hybrids' snapshots) are sent the
same way, and, before the first step, rank 0's memory plan (the workers' pools match it).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import weakref
from typing import Any

import torch
import torch.distributed as dist

from ..distributed import TensorParallel, init_group
from .model_runner import KVCacheSpec, ModelRunner, StepBatch, StepResult
from .runner_output import GrammarMask, ModelRunnerOutput
from .scheduler import ScheduledSequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _send(command: str, payload: Any = None) -> tuple[str, Any]:
    message = [command, payload]
    dist.broadcast_object_list(message, src=0)
    return message[0], message[1]


class ParallelRunner:
    """Rank 0's runner: each call is sent to the workers first, then run here in step with them."""

    def __init__(self, runner: ModelRunner, workers: list[multiprocessing.Process], threads: int):
        """`threads`: this process's torch threads before it joined the group, given back at shutdown."""
        self.runner = runner
        self._finalizer = weakref.finalize(self, _stop_workers, workers, threads)

    def execute_model(self, scheduled: list[ScheduledSequence], block_tables: list[list[int]],
                      grammar_mask: GrammarMask, state_slots: list[int] | None = None) -> ModelRunnerOutput:
        batch = self.runner.prepare(scheduled, block_tables, state_slots)
        return self.runner.collect(scheduled, batch, self.execute(batch), grammar_mask)

    def execute(self, batch: StepBatch) -> StepResult:
        _send("execute", batch)
        return self.runner.execute(batch)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            _send("copy_blocks", copies)
        self.runner.copy_blocks(copies)

    def copy_states(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            _send("copy_states", copies)
        self.runner.copy_states(copies)

    def shutdown(self) -> None:
        self._finalizer()


def _stop_workers(workers: list[multiprocessing.Process], threads: int) -> None:
    if dist.is_initialized():
        _send("stop")
        dist.destroy_process_group()
    torch.set_num_threads(threads)
    for worker in workers:
        worker.join(timeout=30)
        if worker.is_alive():
            worker.kill()


def start_workers(size: int, port: int, worker_main, *args) -> list[multiprocessing.Process]:
    """Ranks 1..size-1 as spawned processes running `worker_main(rank, size, port, *args)`."""
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=worker_main, args=(rank, size, port, *args), daemon=True,
                               name=f"pagedllm-tp-{rank}") for rank in range(1, size)]
    for worker in workers:
        worker.start()
    return workers


def send_plan(spec: KVCacheSpec) -> None:
    """Rank 0's memory plan, to every worker: each pool holds as many blocks and state slots as rank 0's
    scheduler hands out (their sizes planned for the rank holding the most heads)."""
    _send("plan", spec)


def receive_plan() -> KVCacheSpec:
    command, spec = _send("", None)
    if command != "plan":
        raise RuntimeError(f"tensor-parallel worker: expected rank 0's memory plan, got {command!r}")
    return spec


def serve_steps(runner: ModelRunner) -> None:
    """A worker's life: run each step rank 0 sends, until it says stop."""
    while True:
        command, payload = _send("", None)
        if command == "execute":
            runner.execute(payload)
        elif command == "copy_blocks":
            runner.copy_blocks(payload)
        elif command == "copy_states":
            runner.copy_states(payload)
        else:
            break
    dist.destroy_process_group()


def exit_with_parent() -> None:
    """A worker whose engine process is gone (even by kill -9) must not wait for it forever."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=lambda: (parent.join(), os._exit(1)), name="parent-watch", daemon=True).start()


def join_group(rank: int, size: int, port: int, device: str) -> TensorParallel:
    torch.set_num_threads(max(1, torch.get_num_threads() // size))  # the ranks share this machine's cores
    return init_group(rank, size, port, device)
