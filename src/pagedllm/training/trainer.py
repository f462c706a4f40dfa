"""`pagedllm train`: supervised fine-tuning — LoRA adapters or every weight — of pagedllm's own model.

The model is the serving transformer loaded in float (a GGUF file's blocks dequantised), run over whole
sequences by the cache-less attention backend (attention/sequences.py) so that autograd reaches every
weight. A step: the next `global_batch` rows (data.py), split over the ranks and into micro-batches;
each micro-batch's answer-token losses are summed and divided by the answer tokens of the whole step, so
the gradient — summed over micro-batches and then over ranks with one all-reduce — is the token-weighted
mean over the step whatever the split. Then gradient clipping, AdamW, the learning-rate schedule.

At every logging step each rank's per-channel (loss sum, tokens) are gathered with `all_gather_object`
and rank 0 writes them (run_log.py). A checkpoint (`checkpoints/step-N/`: trainable tensors, optimizer,
schedule, step; a LoRA run's adapter folder too) is written whole or not at all; `--resume` goes on from
the last one. The data position is the step itself: the row order is a function of the seed and epoch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..attention.sequences import SequenceBackend
from ..errors import PagedLLMError
from ..models.loaders import load_model, read_model_config, resolve_model
from ..tokenizer.tokenizer import load_tokenizer
from .data import BatchPlan, Dataset, Example, read_dataset
from .lora import TARGET_NAMES, TrainableAdapter
from .run_log import RunLog

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("fp32", "bf16")
# Fields a resumed run must share with the run it goes on from (the rest — steps, saving, logging — may change).
_RESUME_FIELDS = ("model", "data", "mode", "lora_rank", "lora_alpha", "lora_targets", "batch_size", "grad_accum",
                  "nproc", "max_length", "seed")


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out: str
    model: str | None = None  # None: the default model
    mode: str = "lora"  # lora or full
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = TARGET_NAMES
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 4  # rows per micro-batch on each rank
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # None: 2e-4 for LoRA, 1e-5 for every weight
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "linear"
    max_grad_norm: float = 1.0  # 0: no clipping
    max_length: int = 1024
    precision: str = "fp32"
    seed: int = 0
    log_every: int = 1
    save_every: int = 100  # and always at the end; 0: only at the end
    keep_checkpoints: int = 2
    nproc: int = 1
    device: str = "cpu"
    resume: bool = False

    def __post_init__(self):
        checks = [
            (self.mode in ("lora", "full"), f"--mode must be lora or full, got {self.mode!r}"),
            (self.schedule in SCHEDULES, f"--lr-schedule must be one of {', '.join(SCHEDULES)}"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1"),
            (min(self.batch_size, self.grad_accum, self.nproc, self.log_every, self.keep_checkpoints) >= 1,
             "--batch-size, --grad-accum, --nproc, --log-every and --keep-checkpoints must be at least 1"),
            (self.save_every >= 0 and self.warmup_steps >= 0 and self.max_grad_norm >= 0 and self.weight_decay >= 0,
             "--save-every, --warmup-steps, --max-grad-norm and --weight-decay cannot be negative"),
            (self.lr is None or 0 < self.lr < 1, f"--lr must be in (0, 1), got {self.lr}"),
            (self.max_length >= 2, "--max-length must be at least 2"),
        ]
        for ok, message in checks:
            if not ok:
                raise PagedLLMError(message)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.mode == "lora" else 1e-5)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.nproc


@dataclass
class ChannelLosses:
    """Answer-token loss sums and token counts per channel since the last logging step (one rank's)."""

    sums: dict[str, list[float]] = field(default_factory=dict)

    def add(self, channels: list[str], channel_of_token: torch.Tensor, losses: torch.Tensor) -> None:
        count = len(channels)
        loss_sums = torch.zeros(count, dtype=torch.float64).index_add_(0, channel_of_token.cpu(),
                                                                       losses.detach().double().cpu())
        tokens = torch.bincount(channel_of_token.cpu(), minlength=count)
        for i, channel in enumerate(channels):
            if tokens[i]:
                entry = self.sums.setdefault(channel, [0.0, 0])
                entry[0] += float(loss_sums[i])
                entry[1] += int(tokens[i])

    def gathered(self, world: int) -> dict[str, list[float]]:
        """Every rank's sums added (a collective: every rank calls it), then cleared."""
        parts = [self.sums]
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, self.sums)
        total: dict[str, list[float]] = {}
        for part in parts:
            for channel, (loss_sum, tokens) in part.items():
                entry = total.setdefault(channel, [0.0, 0])
                entry[0] += loss_sum
                entry[1] += tokens
        self.sums = {}
        return total


def answer_losses(model, examples: list[Example], backend: SequenceBackend,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropy of every answer token of `examples` (one flat batch, one forward pass), and the
    index of the example each loss belongs to."""
    lengths = [len(e.ids) for e in examples]
    ids = torch.tensor([t for e in examples for t in e.ids], device=device)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
    hidden = model(ids, positions, [None] * len(model.layers), backend.metadata(lengths, device))
    # Answer tokens after each row's first: the token before each one predicts it.
    answer = torch.tensor([a for e in examples for a in e.answer]) & (positions.cpu() > 0)
    targets = answer.nonzero()[:, 0]
    owner = torch.repeat_interleave(torch.arange(len(examples)), torch.tensor(lengths))[targets]
    targets = targets.to(device)
    logits = model.compute_logits(hidden[targets - 1])
    return F.cross_entropy(logits.float(), ids[targets], reduction="none"), owner


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """The learning rate's multiplier for optimizer step `step` (0-based): linear warm-up, then decay."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1 - progress) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """One rank of a run."""

    def __init__(self, config: TrainConfig, rank: int = 0, world: int = 1, dataset: Dataset | None = None):
        """`dataset`: the rows already read (train() checks them before a run starts), else read here."""
        self.config, self.rank, self.world = config, rank, world
        self.folder = Path(config.out).expanduser()
        self.device = torch.device(f"cuda:{rank}" if config.device == "cuda" and world > 1 else config.device)
        torch.manual_seed(config.seed)
        self.source = resolve_model(config.model)
        self.model_config, self.family = read_model_config(self.source)
        self.dataset = dataset or read_dataset(config.data, load_tokenizer(self.source), config.max_length)
        self.model, self.params, self.adapter = self._trainable_model()
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.plan = BatchPlan(len(self.dataset.examples), config.global_batch, config.seed)
        self.total_steps = config.max_steps or config.epochs * self.plan.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, config.warmup_steps, config.schedule))
        self.backend = SequenceBackend()
        self.losses = ChannelLosses()
        self.channel_index = {c: i for i, c in enumerate(self.dataset.channels)}
        self.step = 0

    def _trainable_model(self):
        cfg = self.config
        # A frozen base trained through LoRA in bfloat16 is kept in it; trained weights stay float32 (master copies).
        dtype = torch.bfloat16 if cfg.mode == "lora" and cfg.precision == "bf16" else torch.float32
        model = load_model(self.source, self.device, dtype, quantization="none")
        model.drop_fused_decode()  # the fused C++ decode layers have no backward pass
        model.requires_grad_(False)
        if cfg.mode == "lora":
            adapter = TrainableAdapter(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets).to(self.device)
            return model, list(adapter.parameters()), adapter
        if model.config.normalized_head:
            raise PagedLLMError("full fine-tuning of a NormHead model (Baichuan 2) is not supported: train LoRA")
        model.requires_grad_(True)
        return model, [p for p in model.parameters() if p.requires_grad], None

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self) -> None:
        if self.config.resume:
            self._resume()
        self.folder.mkdir(parents=True, exist_ok=True)
        log = RunLog(self.folder, self.step if self.config.resume else None) if self.rank == 0 else None
        try:
            while self.step < self.total_steps:
                self.train_step()
                self.step += 1
                at_end = self.step == self.total_steps
                saving = at_end or (self.config.save_every and self.step % self.config.save_every == 0)
                if saving or self.step % self.config.log_every == 0:
                    self._log(log)
                if saving:
                    self._save_checkpoint()
            if self.rank == 0:
                self._write_result()
        finally:
            if log is not None:
                log.close()

    def train_step(self) -> None:
        """One optimizer step over the rows of step `self.step` (the caller advances it)."""
        cfg, examples = self.config, self.dataset.examples
        rows = self.plan.step_rows(self.step)
        step_tokens = sum(examples[r].answer_tokens for r in rows)  # over every rank: the loss's denominator
        mine = self.plan.rank_rows(rows, self.rank, self.world)
        self.optimizer.zero_grad(set_to_none=True)
        for micro in self.plan.micro_batches(mine, cfg.batch_size):
            batch = [examples[r] for r in micro]
            with torch.autocast(self.device.type, torch.bfloat16, enabled=cfg.precision == "bf16"):
                losses, owner = answer_losses(self.model, batch, self.backend, self.device)
            (losses.sum() / step_tokens).backward()
            channel_of_row = torch.tensor([self.channel_index[e.channel] for e in batch])
            self.losses.add(self.dataset.channels, channel_of_row[owner], losses)
        if self.world > 1:
            self._all_reduce_gradients()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.step_lr = self.scheduler.get_last_lr()[0]  # the rate this step ran at (logged)
        self.optimizer.step()
        self.scheduler.step()

    def _all_reduce_gradients(self) -> None:
        """Sum the ranks' gradients in one collective (a rank with no rows this step adds zeros)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for p, part in zip(self.params, flat.split([g.numel() for g in grads])):
            p.grad = part.view_as(p)

    def _log(self, log: RunLog | None) -> None:
        sums = self.losses.gathered(self.world)
        if log is None:
            return
        lr = self.step_lr
        means = log.write(self.step, self.step / self.plan.steps_per_epoch, lr, sums)
        shown = "  ".join(f"{c} {v:.4f}" for c, v in means.items())
        print(f"step {self.step}/{self.total_steps}  lr {lr:.3g}  loss: {shown}", file=sys.stderr, flush=True)

    # -- checkpoints -------------------------------------------------------------------------------------
    @property
    def _checkpoints(self) -> Path:
        return self.folder / "checkpoints"

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        if self.adapter is not None:
            return {k: v.detach().cpu() for k, v in self.adapter.state_dict().items()}
        return {k: p.detach().cpu() for k, p in self.model.named_parameters()}

    def _save_checkpoint(self) -> None:
        if self.rank == 0:
            final = self._checkpoints / f"step-{self.step:06d}"
            partial = self._checkpoints / f".step-{self.step:06d}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            torch.save({"step": self.step, "trainable": self._trainable_state(),
                        "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "rng": torch.get_rng_state()}, partial / "state.pt")
            if self.adapter is not None:
                self.adapter.save_peft(partial / "adapter", self.model_config, self.family, str(self.source.path))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)  # a checkpoint is whole or absent, whenever the run is killed
            for old in completed_checkpoints(self.folder)[:-self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        if self.world > 1:
            dist.barrier()

    def _resume(self) -> None:
        checkpoints = completed_checkpoints(self.folder)
        if not checkpoints:
            return  # nothing saved yet: the run starts from the beginning
        state = torch.load(checkpoints[-1] / "state.pt", map_location=self.device, weights_only=True)
        target = self.adapter if self.adapter is not None else self.model
        missing, unexpected = target.load_state_dict(state["trainable"], strict=False)
        if unexpected or (self.adapter is not None and missing):
            raise PagedLLMError(f"{checkpoints[-1]}: its tensors do not fit this model and --mode")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"].cpu())
        self.step = int(state["step"])
        if self.rank == 0:
            print(f"resuming {self.folder} from step {self.step}", file=sys.stderr, flush=True)

    def _write_result(self) -> None:
        if self.adapter is not None:
            out = self.folder / "adapter"
            self.adapter.save_peft(out, self.model_config, self.family, str(self.source.path))
            print(f"wrote {out}; serve it with: pagedllm serve {self.source.path} --enable-lora "
                  f"--lora-modules {self.folder.name}={out}", file=sys.stderr, flush=True)
            return
        from .export import write_trained_model

        out, line = write_trained_model(self.model, self.source, self.folder)
        print(f"{line}; serve it with: pagedllm serve {out}", file=sys.stderr, flush=True)


def completed_checkpoints(folder: Path) -> list[Path]:
    """A run's whole checkpoints, oldest first."""
    found = [p for p in (folder / "checkpoints").glob("step-*") if (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


# -- starting a run ------------------------------------------------------------------------------------
def prepare_run(config: TrainConfig) -> Path:
    """Check the run folder against the config (a new run in a folder that holds one is refused; a resumed
    run must match its settings) and record the config."""
    folder = Path(config.out).expanduser()
    recorded = folder / "run.json"
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    if recorded.is_file():
        if not config.resume:
            raise PagedLLMError(f"{folder} holds a training run already: --resume to go on with it, or another --out")
        try:
            before = json.loads(recorded.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PagedLLMError(f"{recorded}: unreadable ({exc})") from None
        changed = [k for k in _RESUME_FIELDS if before.get(k) != settings[k]]
        if changed:
            raise PagedLLMError(f"--resume: {', '.join('--' + k.replace('_', '-') for k in changed)} differ from "
                                f"the run in {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(settings, indent=1), encoding="utf-8")
    return folder


def train(config: TrainConfig) -> None:
    """Run `config` in this process, or in `nproc` processes (torch.distributed: gloo on the CPU, NCCL on GPUs)."""
    # A bad row stops the run here, before the run folder is claimed or any process starts.
    dataset = read_dataset(config.data, load_tokenizer(resolve_model(config.model)), config.max_length)
    prepare_run(config)
    if config.nproc == 1:
        Trainer(config, dataset=dataset).run()
        return
    if config.device == "cuda" and torch.cuda.device_count() < config.nproc:
        raise PagedLLMError(f"--nproc {config.nproc} on cuda needs as many GPUs, this machine has "
                            f"{torch.cuda.device_count()}")
    import torch.multiprocessing as mp

    try:
        mp.spawn(_rank_main, args=(config, _free_port()), nprocs=config.nproc)
    except mp.ProcessExitedException as exc:
        raise PagedLLMError(f"a training process stopped (exit code {exc.exit_code}); see its message above") from None


def _rank_main(rank: int, config: TrainConfig, port: int) -> None:
    backend = "nccl" if config.device == "cuda" else "gloo"
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.nproc))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=config.nproc)
    try:
        Trainer(config, rank, config.nproc).run()
        dist.barrier()  # leave together, once rank 0 has written the result: gloo aborts a group torn down early
    except PagedLLMError as exc:
        print(f"pagedllm: error (rank {rank}): {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        dist.destroy_process_group()
    # Everything is written and closed: leave without the interpreter's teardown, where gloo's threads
    # still aborted a finished rank now and then ("terminate called without an active exception", -6).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

