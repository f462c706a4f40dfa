"""infer(): run a JSONL file of prompts through N model replicas into a JSONL file of answers.

The coordinating process reads the input, skips the lines the output already records, keeps
every replica topped up with rows (up to `rows_in_flight` each, so engines batch continuously and
fast replicas take more), and appends each finished record to the output (see journal.py for why
that makes the job exactly-once and resumable). Records appear in the order rows finish; each
carries its input `line`.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...config import EngineConfig, build_engine_config
from ...sampling_params import SamplingParams
from ...errors import shown
from .backends import Backend, BatchError, LocalBackend, RayBackend
from .board import JobBoard, JobState
from .journal import JournalError, OutputJournal
from .rows import BatchTask, RowError, error_record, load_row, parse_row, row_id
from .worker import ReplicaPlacement

BACKENDS = ("local", "ray")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
DEFAULT_PARAMS = SamplingParams(temperature=0.0, max_tokens=256)  # greedy: a resumed job gives the same answers


@dataclass
class BatchSummary:
    rows: int  # non-blank input lines
    already_done: int  # recorded by earlier runs of the job
    written: int = 0  # records written by this run
    errors: int = 0  # ... of which error records
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_time_s: float = 0.0  # the whole call, model loading included
    startup_s: float = 0.0  # until every replica had loaded its model

    @property
    def generation_s(self) -> float:
        return max(self.wall_time_s - self.startup_s, 1e-9)

    @property
    def rows_per_s(self) -> float:
        return self.written / self.generation_s

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.generation_s

    def format(self) -> str:
        if not self.written:
            return f"nothing to do: all {self.rows} rows are already in the output"
        return (f"{self.written} rows written ({self.errors} errors; {self.already_done} done before), "
                f"{self.prompt_tokens} prompt + {self.completion_tokens} completion tokens in {self.wall_time_s:.1f} s "
                f"(start-up {self.startup_s:.1f} s): {self.rows_per_s:.2f} rows/s, "
                f"{self.tokens_per_s:.1f} completion tokens/s")


def infer(model_path: str | None, data_path: str | Path, output_path: str | Path, num_workers: int = 1, *,
          devices: Sequence[str] | None = None, threads_per_worker: int | None = None, backend: str = "local",
          ray_address: str | None = None, sampling_params: SamplingParams | None = None,
          engine_options: dict[str, Any] | None = None, rows_in_flight: int | None = None,
          progress: bool = True, board: JobBoard | None = None) -> BatchSummary:
    """Answer every row of `data_path` into `output_path` with `num_workers` replicas of the model.

    Run it again after any interruption to finish the job; a finished job is left as it is.
    `sampling_params` are the defaults rows may override (greedy, 256 tokens when not given);
    `engine_options` are build_engine_config's (kv_cache_memory, max_num_seqs, dtype, ...).
    The job's progress goes to `board` (the default JobBoard when not given) for servers' engine panels.
    """
    started = time.monotonic()
    if rows_in_flight is not None and (not isinstance(rows_in_flight, int) or rows_in_flight < 1):
        raise BatchError(f"rows_in_flight must be a positive integer, got {rows_in_flight!r}")
    config = build_engine_config(model_path, **(engine_options or {}))
    placements = plan_placements(num_workers, devices, threads_per_worker, config.tensor_parallel_size)
    if backend not in BACKENDS:
        raise BatchError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    data_path, output_path = Path(data_path), Path(output_path)
    if not data_path.is_file():
        raise BatchError(f"input {data_path} is not a file")
    if output_path.exists() and output_path.resolve() == data_path.resolve():
        raise BatchError("the output must not be the input file")
    journal = _open_journal(output_path)
    try:
        job = _Job(config, data_path, journal, sampling_params or DEFAULT_PARAMS,
                   rows_in_flight or 2 * config.scheduler.max_num_seqs, board or JobBoard(), len(placements))
        return job.run(lambda: _backend(backend, config, placements, ray_address), started, progress)
    finally:
        journal.close()


def plan_placements(num_workers: int, devices: Sequence[str] | None,
                    threads_per_worker: int | None, tensor_parallel_size: int = 1) -> list[ReplicaPlacement]:
    """Replica i runs on devices[i % len(devices)] with its own slice of this machine's cores; with
    tensor parallelism of N, on the N devices from devices[i·N] on (going round the list)."""
    if not isinstance(num_workers, int) or num_workers < 1:
        raise BatchError(f"the number of workers must be a positive integer, got {num_workers!r}")
    devices = list(devices or ["cpu"])
    for device in devices:
        if not _DEVICE.match(device):
            raise BatchError(f"device {device!r} is not cpu, cuda or cuda:N")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if threads_per_worker is not None and (not isinstance(threads_per_worker, int) or threads_per_worker < 1):
        raise BatchError(f"threads per worker must be a positive integer, got {threads_per_worker!r}")
    threads = threads_per_worker or max(1, len(cores) // num_workers)
    pin = threads * num_workers <= len(cores)  # disjoint cores when they go round, else let the OS share
    n = tensor_parallel_size
    groups = [tuple(devices[(i * n + r) % len(devices)] for r in range(n)) for i in range(num_workers)]
    return [ReplicaPlacement(group[0], threads, tuple(cores[i * threads:(i + 1) * threads]) if pin else (),
                             group if n > 1 else ())
            for i, group in enumerate(groups)]


def _open_journal(path: Path) -> OutputJournal:
    try:
        return OutputJournal(path)
    except JournalError as exc:
        raise BatchError(str(exc)) from None


def _backend(name: str, config: EngineConfig, placements: list[ReplicaPlacement], address: str | None) -> Backend:
    return LocalBackend(config, placements) if name == "local" else RayBackend(config, placements, address)


class _Job:
    PUBLISH_EVERY_S = 0.5

    def __init__(self, config: EngineConfig, data_path: Path, journal: OutputJournal, defaults: SamplingParams,
                 rows_in_flight: int, board: JobBoard, workers: int):
        self.data_path, self.journal, self.defaults = data_path, journal, defaults
        self.rows_in_flight = rows_in_flight
        # One read of the input before any work: it counts the rows and checks the output belongs to this input.
        self.summary = BatchSummary(rows=sum(1 for _ in self._scan()), already_done=len(journal.done))
        self._bar = None
        self._feed_start = time.monotonic()
        self.board, self._published = board, 0.0
        self.state = JobState(os.getpid(), data_path.name, journal.path.name, workers, self.summary.rows,
                              self.summary.already_done, started_at=time.time())

    def run(self, make_backend, started: float, progress: bool) -> BatchSummary:
        if self.summary.already_done < self.summary.rows:
            self._publish("starting")
            backend = make_backend()
            try:
                backend.start()
                self.summary.startup_s = time.monotonic() - started
                self._publish("running")
                self._feed(backend, progress)
            except BaseException as exc:
                stopped = isinstance(exc, KeyboardInterrupt)
                self._publish("stopped" if stopped else "failed", "" if stopped else str(exc) or type(exc).__name__)
                raise
            finally:
                backend.close()
            self._publish("finished")
        self.summary.wall_time_s = time.monotonic() - started
        return self.summary

    def _publish(self, state: str | None = None, message: str = "") -> None:
        """The job's state on the board: at every change of state, and at most every PUBLISH_EVERY_S in between."""
        now = time.monotonic()
        if state is None and now - self._published < self.PUBLISH_EVERY_S:
            return
        self._published = now
        summary, elapsed = self.summary, max(now - self._feed_start, 1e-9)
        job = self.state
        job.state, job.message = state or job.state, message
        job.done, job.errors = summary.already_done + summary.written, summary.errors
        job.completion_tokens = summary.completion_tokens
        job.rows_per_s, job.tokens_per_s = summary.written / elapsed, summary.completion_tokens / elapsed
        self.board.publish(job)

    def _feed(self, backend: Backend, progress: bool) -> None:
        from tqdm import tqdm

        self._feed_start = time.monotonic()
        pending, exhausted = self._pending(), False
        with tqdm(total=self.summary.rows, initial=self.summary.already_done, unit="row", disable=not progress,
                  dynamic_ncols=True, smoothing=0.1) as self._bar:
            while not exhausted or any(backend.in_flight):
                if not exhausted:
                    exhausted = self._top_up(backend, pending)
                self._write(backend.poll(timeout=0.5))

    def _top_up(self, backend: Backend, pending: Iterator[BatchTask | dict]) -> bool:
        """Hand rows to the least-loaded replicas until each holds `rows_in_flight`; error records met on the
        way are written at once. True when the input has run out."""
        load = list(backend.in_flight)
        batches: list[list[BatchTask]] = [[] for _ in load]
        errors, exhausted = [], False
        while min(load) < self.rows_in_flight:
            item = next(pending, None)
            if item is None:
                exhausted = True
                break
            if isinstance(item, dict):
                errors.append(item)
                continue
            worker = load.index(min(load))
            batches[worker].append(item)
            load[worker] += 1
        self._write(errors)
        for worker, tasks in enumerate(batches):
            if tasks:
                backend.submit(worker, tasks)
        return exhausted

    def _write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        try:
            self.journal.write(records)
        except JournalError as exc:
            raise BatchError(str(exc)) from None
        summary = self.summary
        summary.written += len(records)
        for record in records:
            summary.errors += "error" in record
            summary.prompt_tokens += record.get("prompt_tokens", 0)
            summary.completion_tokens += record.get("completion_tokens", 0)
        rate = summary.completion_tokens / max(time.monotonic() - self._feed_start, 1e-9)
        self._bar.set_postfix_str(f"{rate:.1f} tok/s, {summary.errors} errors", refresh=False)
        self._bar.update(len(records))
        self._publish()

    def _pending(self) -> Iterator[BatchTask | dict]:
        """Rows the output does not record yet: a BatchTask, or an error record for a malformed row."""
        for line, row, id_, problem in self._scan():
            if line not in self.journal.done:
                yield error_record(line, id_, problem) if problem else self._task(row, line, id_)

    def _scan(self) -> Iterator[tuple[int, Any, Any, str | None]]:
        """(line, decoded row, id, what is wrong with it) for every row, checked against the output's records."""
        first_line_of: dict[Any, int] = {}
        lines: set[int] = set()
        for line, text in _lines(self.data_path):
            lines.add(line)
            try:
                row, problem = load_row(text), None
            except RowError as exc:
                row, problem = None, str(exc)
            id_ = row_id(row, line)
            self._check_recorded(line, id_)
            first = first_line_of.setdefault(id_, line)
            if first != line:
                problem = f"duplicate id {shown(id_)} (first on line {first})"
            yield line, row, id_, problem
        self._check_no_strays(lines)

    def _task(self, row: Any, line: int, id_: Any) -> BatchTask | dict:
        try:
            return parse_row(row, line, self.defaults)
        except RowError as exc:
            return error_record(line, id_, str(exc))

    def _check_recorded(self, line: int, id_: Any) -> None:
        recorded = self.journal.done.get(line, id_)
        if recorded != id_:
            raise BatchError(f"{self.journal.path} records id {recorded!r} for input line {line}, which now has id "
                             f"{id_!r}: the input changed since the job began; write to a new --output")

    def _check_no_strays(self, lines: set[int]) -> None:
        stray = next((line for line in self.journal.done if line not in lines), None)
        if stray is not None:
            raise BatchError(f"{self.journal.path} records input line {stray}, which {self.data_path} does not have: "
                             "the input changed since the job began; write to a new --output")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every non-blank line; bytes that are not UTF-8 become U+FFFD."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            text = raw.decode("utf-8", errors="replace")
            if text.strip():
                yield number, text
