"""The job's output file, which is also its only record of progress.

Exactly-once rests on three rules. (1) Only the coordinating process writes, one whole JSON line
per record, and a record counts as written once its newline is in the file. (2) On start the file
is read back: every complete line is a finished input line; a torn last line (the job was killed
mid-write) is cut off. (3) An exclusive lock on the file keeps a second job from writing it at the
same time. Lines reach the operating system after every batch of records, so `kill -9` loses
nothing that was written; `fsync` runs at most every `fsync_interval` seconds and on close, which
bounds what a power cut can take back (those rows are then simply computed again).
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: no lock, the rest still holds
    fcntl = None


RECORD_START = b'{"id": '  # how every record begins (rows.py puts the id first)


class JournalError(ValueError):
    """The output file cannot be used for this job; the message says why."""


class OutputJournal:
    def __init__(self, path: str | Path, fsync_interval: float = 1.0):
        self.path = Path(path)
        self._fsync_interval = fsync_interval
        self._last_sync = time.monotonic()
        try:
            self._file = open(self.path, "a+b")
        except OSError as exc:
            raise JournalError(f"cannot open the output {self.path}: {exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(self._file.fileno()).st_mode):  # /dev/zero reads back forever
            self._file.close()
            raise JournalError(f"the output {self.path} is not a regular file (a device or a pipe cannot "
                               "record the job's progress)")
        self._lock()
        self.done: dict[int, Any] = self._read_back()  # input line -> the id its record carries

    def _lock(self) -> None:
        if fcntl is None:
            return
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise JournalError(f"another job is writing {self.path}") from None

    def _read_back(self) -> dict[int, Any]:
        self._file.seek(0)
        data = self._file.read()
        complete = data.rfind(b"\n") + 1
        done: dict[int, Any] = {}
        for number, raw in enumerate(data[:complete].splitlines(), start=1):
            line, id_ = self._parse(raw, number)
            if line in done:
                raise JournalError(f"{self.path} line {number}: input line {line} is recorded twice")
            done[line] = id_
        if complete < len(data):  # a record torn by a kill; its row runs again
            if not data[complete:].startswith(RECORD_START):
                raise JournalError(f"{self.path} ends in a partial line that is not a pagedllm record")
            self._file.truncate(complete)
        return done

    def _parse(self, raw: bytes, number: int) -> tuple[int, Any]:
        try:
            record = json.loads(raw)
            line = record["line"]
        except (ValueError, TypeError, KeyError):
            raise JournalError(f"{self.path} line {number} is not a pagedllm record; "
                               "point --output at a new file or at this job's own output") from None
        if not isinstance(line, int) or isinstance(line, bool) or line < 1:
            raise JournalError(f"{self.path} line {number}: 'line' must be a positive integer")
        return line, record.get("id")

    def write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        try:
            self._file.write(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records))
            self._file.flush()
        except OSError as exc:  # a full disk: the job stops; what reached the file stays done
            raise JournalError(f"cannot write the output {self.path}: {exc.strerror}") from None
        for record in records:
            self.done[record["line"]] = record["id"]
        if time.monotonic() - self._last_sync >= self._fsync_interval:
            self._sync()

    def _sync(self) -> None:
        os.fsync(self._file.fileno())
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self._file.flush()
            self._sync()
        except OSError:
            pass  # a full disk, already reported by the write that met it: what is in the file stays done
        finally:
            self._file.close()  # releases the lock
