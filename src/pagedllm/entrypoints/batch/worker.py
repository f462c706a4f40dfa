"""One model replica of a batch job: an engine kept fed with rows, handing back records.

The same ReplicaWorker runs inside a local worker process and inside a Ray actor. Rows arrive
while others are still generating, so the engine's batch stays full (continuous batching across
the whole job, never chunk by chunk).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any

from ...config import EngineConfig
from ...engine.parallel import exit_with_parent
from ...errors import PagedLLMError
from .rows import BatchTask, error_record, result_record


@dataclass(frozen=True)
class ReplicaPlacement:
    """Where one replica runs: its device, its CPU threads and (when they can be split) its cores."""

    device: str
    threads: int
    cpus: tuple[int, ...] = ()
    group: tuple[str, ...] = ()  # the devices of its tensor-parallel ranks (device is the first)

    def apply(self) -> None:
        """Pin this process before the engine starts any thread pool."""
        import torch

        if self.cpus and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, self.cpus)
        torch.set_num_threads(self.threads)


class ReplicaWorker:
    def __init__(self, config: EngineConfig):
        from .. import create_engine

        self.engine = create_engine(config)
        self._tasks: dict[str, BatchTask] = {}

    @property
    def busy(self) -> bool:
        return bool(self._tasks)

    def add(self, tasks: list[BatchTask]) -> list[dict[str, Any]]:
        """Queue rows in the engine; rows it refuses (too long, bad template…) come back as error records."""
        refused = []
        for task in tasks:
            request_id = str(task.line)
            try:
                prompt = self._prompt(task)
                if task.explicit_max_tokens:
                    self._check_max_tokens(prompt, task.params.max_tokens)
                self.engine.add_request(request_id, prompt, task.params, lora=task.lora)
            except (PagedLLMError, ValueError, TypeError) as exc:
                refused.append(error_record(task.line, task.id, str(exc)))
            else:
                self._tasks[request_id] = task
        return refused

    def _check_max_tokens(self, prompt, max_tokens: int) -> None:
        """A row's own max_tokens past what the context leaves is refused, as the server refuses it (the
        job's default is cut to the context instead)."""
        ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else (
            self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt)
        left = self.engine.max_model_len - len(ids)
        if max_tokens > left:
            raise PagedLLMError(f"max_tokens {max_tokens} is more than the {left} tokens the model's context "
                                f"({self.engine.max_model_len}) leaves after the prompt")

    def _prompt(self, task: BatchTask):
        if task.messages is None:
            return task.prompt
        return {"prompt_token_ids": self.engine.tokenizer.encode_chat(task.messages)}

    def step(self) -> list[dict[str, Any]]:
        """One engine step; the records of the rows it finished."""
        return [result_record(self._tasks.pop(out.request_id), out) for out in self.engine.step() if out.finished]


STOP = None  # the message that ends a local worker


def run_local_worker(index: int, config: EngineConfig, placement: ReplicaPlacement, inbox, outbox) -> None:
    """A local worker process: ("ready" | "error" | "records", index, payload) messages go to `outbox`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle; it stops us
    exit_with_parent()  # a worker whose coordinator is gone (even by kill -9) must not keep computing
    placement.apply()
    try:
        worker = ReplicaWorker(config)
    except (PagedLLMError, ValueError, OSError, RuntimeError) as exc:
        outbox.put(("error", index, str(exc)))
        return
    outbox.put(("ready", index, None))
    while True:
        tasks = _take(inbox, wait=not worker.busy)
        if tasks is STOP:
            return
        records = worker.add(tasks)
        if worker.busy:
            records += worker.step()
        if records:
            outbox.put(("records", index, records))


def _take(inbox, wait: bool) -> list[BatchTask] | None:
    """Everything waiting in the inbox (blocking for the first message only when idle)."""
    import queue

    tasks: list[BatchTask] = []
    try:
        message = inbox.get() if wait else inbox.get_nowait()
        while True:
            if message is STOP:
                return STOP
            tasks.extend(message)
            message = inbox.get_nowait()
    except queue.Empty:
        return tasks
