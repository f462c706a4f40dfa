"""`pagedllm train`: fine-tuning (LoRA or every weight) on JSONL rows, a loss curve per channel."""

from __future__ import annotations

import argparse
from pathlib import Path

from ...errors import PagedLLMError


def add_parsers(sub) -> None:
    train = sub.add_parser("train", help="fine-tune (LoRA or every weight) on JSONL rows, a loss curve per channel")
    train.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                       help="a .gguf file or a Hugging Face folder (default: the default model)")
    train.add_argument("--data", default=None, help="JSONL rows: messages, or prompt and completion; optional channel")
    train.add_argument("--out", default=None, metavar="RUN_DIR",
                       help="the run folder: logs, checkpoints, and the adapter (LoRA) or model (full)")
    train.add_argument("--plot", default=None, metavar="RUN_DIR",
                       help="only draw RUN_DIR's per-channel loss curves to RUN_DIR/loss.png (or --plot-out)")
    train.add_argument("--plot-out", default=None, metavar="FILE.png")
    train.add_argument("--mode", choices=["lora", "full"], default="lora", help="LoRA adapters (default) or every weight")
    train.add_argument("--lora-rank", type=int, default=16)
    train.add_argument("--lora-alpha", type=float, default=32.0)
    train.add_argument("--lora-targets", default=None,
                       help="comma-separated layers to adapt, of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                            "down_proj (default: all of them)")
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    train.add_argument("--batch-size", type=int, default=4, help="rows per micro-batch on each process (default 4)")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    train.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4 LoRA, 1e-5 full)")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--lr-schedule", choices=["linear", "cosine", "constant"], default="linear")
    train.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: none)")
    train.add_argument("--max-length", type=int, default=1024, help="tokens kept of each row (default 1024)")
    train.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                       help="bf16: products in bfloat16 (autocast), trained weights kept in float32")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--log-every", type=int, default=1, help="optimizer steps between logged losses (default 1)")
    train.add_argument("--save-every", type=int, default=100, help="steps between checkpoints (0: at the end only)")
    train.add_argument("--keep-checkpoints", type=int, default=2)
    train.add_argument("--nproc", type=int, default=1,
                       help="data-parallel processes (torch.distributed: gloo on the CPU, NCCL on GPUs)")
    train.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    train.add_argument("--resume", action="store_true", help="go on from RUN_DIR's last checkpoint")


def cmd_train(args: argparse.Namespace) -> int:
    from ...training import TrainConfig, train
    from ...training.lora import TARGET_NAMES
    from ...training.run_log import plot_run

    if args.plot:
        print(f"wrote {plot_run(Path(args.plot), Path(args.plot_out) if args.plot_out else None)}")
        return 0
    if not args.data or not args.out:
        raise PagedLLMError("pagedllm train needs --data FILE.jsonl and --out RUN_DIR (or --plot RUN_DIR)")
    targets = TARGET_NAMES if args.lora_targets is None else tuple(
        t.strip() for t in args.lora_targets.split(",") if t.strip())
    config = TrainConfig(args.data, args.out, args.model_path, args.mode, args.lora_rank, args.lora_alpha, targets,
                         args.epochs, args.max_steps, args.batch_size, args.grad_accum, args.lr, args.weight_decay,
                         args.warmup_steps, args.lr_schedule, args.max_grad_norm, args.max_length, args.precision,
                         args.seed, args.log_every, args.save_every, args.keep_checkpoints, args.nproc, args.device,
                         args.resume)
    train(config)
    return 0


COMMANDS = {"train": cmd_train}
