"""The job board: where running batch jobs publish their progress for the server's engine panel to show.

`pagedllm infer` runs in processes of its own, so a server on the same machine cannot ask its engine;
instead each job keeps a small JSON file, `<pid>.json`, in a folder both know: `$PAGEDLLM_JOBS_DIR`, or
`~/.cache/pagedllm/jobs`. A file is replaced whole (write, then rename), so a reader sees either the old
or the new state. Readers treat the files as untrusted: a file that is not a job's state is skipped.
A running job whose process is gone is shown as "stopped" (it resumes when run again); finished and
stopped jobs leave the board an hour after their last update.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

KEEP_S = 3600.0  # how long a job that no longer runs stays on the board
_STATES = ("starting", "running", "finished", "failed", "stopped")
_FIELDS = {"pid": int, "input": str, "output": str, "state": str, "rows": int, "done": int, "errors": int,
           "completion_tokens": int, "rows_per_s": (int, float), "tokens_per_s": (int, float), "workers": int,
           "started_at": (int, float), "updated_at": (int, float), "message": str}


def default_jobs_dir() -> Path:
    return Path(os.environ.get("PAGEDLLM_JOBS_DIR") or Path.home() / ".cache" / "pagedllm" / "jobs")


@dataclass
class JobState:
    """One job's progress, as the engine panel shows it. `done` counts rows recorded in the output, earlier
    runs' included; `rows_per_s` and `tokens_per_s` are this run's, from its first generated row."""

    pid: int
    input: str  # file names only: the board is served to API clients
    output: str
    workers: int
    rows: int
    done: int
    state: str = "starting"
    errors: int = 0
    completion_tokens: int = 0
    rows_per_s: float = 0.0
    tokens_per_s: float = 0.0
    started_at: float = 0.0
    updated_at: float = 0.0
    message: str = ""  # why a job failed


class JobBoard:
    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder is not None else default_jobs_dir()

    def publish(self, job: JobState) -> None:
        """Write a job's state; a board that cannot be written only loses the panel's view, never the job."""
        job.updated_at = time.time()
        target = self.folder / f"{job.pid}.json"
        partial = target.with_suffix(".tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(asdict(job)))
            os.replace(partial, target)
        except OSError:
            pass

    def jobs(self) -> list[dict[str, Any]]:
        """The jobs on the board, newest first; stale files are cleared on the way."""
        found = []
        for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
            job = _read(path)
            if job is None:
                continue
            if job["state"] in ("starting", "running") and not _alive(job["pid"]):
                job["state"] = "stopped"
            if job["state"] not in ("starting", "running") and time.time() - job["updated_at"] > KEEP_S:
                path.unlink(missing_ok=True)
                continue
            found.append(job)
        return sorted(found, key=lambda j: -j["started_at"])


def _read(path: Path) -> dict[str, Any] | None:
    try:
        job = json.loads(path.read_text()[:65536])
    except (OSError, ValueError):
        return None
    if not isinstance(job, dict) or set(job) != set(_FIELDS) or job.get("state") not in _STATES:
        return None
    if not all(isinstance(job[k], t) and not isinstance(job[k], bool) for k, t in _FIELDS.items()):
        return None
    return job


def _alive(pid: int) -> bool:
    if pid <= 0:  # kill(0) and kill(-1) would reach whole process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except (OverflowError, ValueError):
        return False
    return True
