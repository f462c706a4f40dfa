"""`pagedllm memory`: parameters, weight bytes and KV-cache bytes of a model, and fine-tuning memory."""

from __future__ import annotations

import argparse

from ...errors import PagedLLMError
from .options import parse_bytes


def add_parsers(sub) -> None:
    mem = sub.add_parser("memory", help="parameters, weight bytes and KV-cache bytes of a model")
    mem.add_argument("model", nargs="?", default=None)
    mem.add_argument("--budget", type=parse_bytes, default="4GiB", help="KV budget to fit tokens in (default 4GiB)")
    mem.add_argument("--train", choices=["full", "lora"], default=None,
                     help="also the memory of fine-tuning: every parameter, or LoRA adapters on every linear layer")
    mem.add_argument("--seq-len", type=int, default=2048, help="training sequence length (default 2048)")
    mem.add_argument("--batch", type=int, default=1, help="sequences per training step (default 1)")
    mem.add_argument("--optimizer", choices=["adamw", "adamw8bit", "sgd"], default="adamw")
    mem.add_argument("--train-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                     help="weights, gradients and activations (16-bit: with float32 master weights)")
    mem.add_argument("--lora-rank", type=int, default=16)
    mem.add_argument("--gradient-checkpointing", action="store_true",
                     help="keep each layer's input only and recompute the rest in the backward pass")


def cmd_memory(args: argparse.Namespace) -> int:
    from ...models.loaders import resolve_model
    from ...tools.memory import TrainingPlan, format_report, format_training, memory_report

    try:
        plan = TrainingPlan(args.train, args.seq_len, args.batch, args.optimizer, args.train_dtype, args.lora_rank,
                            args.gradient_checkpointing) if args.train else None
    except ValueError as exc:
        raise PagedLLMError(str(exc)) from None
    report = memory_report(resolve_model(args.model))
    print(format_report(report, args.budget))
    if plan is not None:
        print("\n" + format_training(report, plan))
    return 0


COMMANDS = {"memory": cmd_memory}
