"""What a training run records: per-channel losses in a CSV and in TensorBoard, and their PNG curves.

`log.csv` holds one row per (logging step, channel): step, epoch, lr, channel, loss, tokens — the
token-weighted mean loss of the channel's answer tokens since the previous logging step, over every
rank. The channel `all` is every token together. TensorBoard gets the same as `loss/<channel>` and `lr`.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import PagedLLMError

ALL = "all"
FIELDS = ("step", "epoch", "lr", "channel", "loss", "tokens")


class RunLog:
    """The logs of run `folder`; a resumed run (from `resume_step`) drops what came after its checkpoint."""

    def __init__(self, folder: Path, resume_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise PagedLLMError("pagedllm train writes TensorBoard logs: pip install tensorboard "
                                "(or pip install 'pagedllm[train]')") from None
        self.path = folder / "log.csv"
        if resume_step is not None and self.path.is_file():
            _keep_rows(self.path, resume_step)
        new = not self.path.is_file()
        self.file = self.path.open("a", newline="", encoding="utf-8")
        self.csv = csv.writer(self.file)
        if new:
            self.csv.writerow(FIELDS)
        purge = resume_step + 1 if resume_step is not None else None
        self.board = SummaryWriter(str(folder / "tensorboard"), purge_step=purge)

    def write(self, step: int, epoch: float, lr: float, sums: dict[str, list[float]]) -> dict[str, float]:
        """`sums`: channel → [loss sum, tokens]. Returns the mean loss of each channel and of all."""
        total = [sum(s for s, _ in sums.values()), sum(n for _, n in sums.values())]
        means = {}
        for channel, (loss_sum, tokens) in [*sorted(sums.items()), (ALL, total)]:
            if tokens:
                means[channel] = loss_sum / tokens
                self.csv.writerow([step, f"{epoch:.4f}", f"{lr:.6g}", channel, f"{means[channel]:.6f}", int(tokens)])
                self.board.add_scalar(f"loss/{channel}", means[channel], step)
        self.board.add_scalar("lr", lr, step)
        self.file.flush()
        self.board.flush()
        return means

    def close(self) -> None:
        self.file.close()
        self.board.close()


def _keep_rows(path: Path, last_step: int) -> None:
    with path.open(newline="", encoding="utf-8") as f:
        rows = [row for row in csv.DictReader(f) if int(row["step"]) <= last_step]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def read_log(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """channel → [(step, loss)] from a run's log.csv."""
    path = Path(folder).expanduser() / "log.csv"
    if not path.is_file():
        raise PagedLLMError(f"{folder}: no log.csv (not a pagedllm train run folder?)")
    curves: dict[str, list[tuple[int, float]]] = {}
    try:
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                curves.setdefault(row["channel"], []).append((int(row["step"]), float(row["loss"])))
    except (KeyError, TypeError, ValueError) as exc:
        raise PagedLLMError(f"{path}: not a pagedllm training log ({exc})") from None
    return curves


def plot_run(folder: Path, out: Path | None = None) -> Path:
    """Draw each channel's loss curve (and all channels together, dashed) to a PNG; returns its path."""
    try:
        import matplotlib
    except ImportError:
        raise PagedLLMError("--plot draws with matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = read_log(folder)
    if not curves:
        raise PagedLLMError(f"{folder}/log.csv has no logged step yet")
    out = out or Path(folder).expanduser() / "loss.png"
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for channel, points in sorted(curves.items(), key=lambda item: item[0] == ALL):
        steps, losses = zip(*points)
        ax.plot(steps, losses, label=channel, linestyle="--" if channel == ALL else "-",
                color="0.4" if channel == ALL else None, linewidth=1.2 if channel == ALL else 1.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over answer tokens)")
    ax.set_title(f"per-channel training loss — {Path(folder).name}")
    ax.grid(alpha=0.3)
    ax.legend(title="channel")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
