"""Training steps: `pagedllm train`'s LoRA step against transformers + PEFT on the same rows, in one run.

    .venv/bin/python benchmarks/train.py [--steps 12] [--batch-size 8] [--data examples/train/two_channels.jsonl]

The default model (SmolLM2-135M, its GGUF weights dequantised to float32) on both sides: pagedllm reads the
GGUF file, transformers a float32 Hugging Face folder written from it by `pagedllm convert`. Both: LoRA
rank 16 / alpha 32 on every linear layer of the blocks, AdamW, float32, the same rows per step (the
trainer's plan), answer tokens only in the loss. The first two steps warm up and are not timed. Prints
one JSON line: seconds per step and answer-token throughput of each side, the ratio, the CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def timed_steps(step, steps: int, warmup: int = 2) -> float:
    for i in range(warmup):
        step(i)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    return (time.perf_counter() - start) / steps


def pagedllm_side(data: str, out: Path, steps: int, batch_size: int):
    from pagedllm.training import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(data, str(out), max_steps=steps + 2, batch_size=batch_size, save_every=0))

    def step(_):
        trainer.train_step()  # the loop's own step, without the run's logging and saving
        trainer.step += 1

    return trainer, timed_steps(step, steps)


def transformers_side(trainer, folder: Path, steps: int) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pagedllm.training.data import padded_batch

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    examples = trainer.dataset.examples

    def step(i):
        batch = [examples[r] for r in trainer.plan.step_rows(i)]
        ids, mask, labels = padded_batch(batch)
        optimizer.zero_grad(set_to_none=True)
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()

    return timed_steps(step, steps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data", default="examples/train/two_channels.jsonl")
    args = parser.parse_args()
    from pagedllm.models.loaders import resolve_model
    from pagedllm.tools.export import ConvertPlan, convert

    with tempfile.TemporaryDirectory() as tmp:
        trainer, ours = pagedllm_side(args.data, Path(tmp) / "run", args.steps, args.batch_size)
        convert(resolve_model(None), Path(tmp) / "hf", ConvertPlan())
        peer = transformers_side(trainer, Path(tmp) / "hf", args.steps)
    rows = [trainer.plan.step_rows(i) for i in range(2, 2 + args.steps)]
    answer_tokens = sum(trainer.dataset.examples[r].answer_tokens for step in rows for r in step) / args.steps
    print(json.dumps({"benchmark": "train_lora_step", "cpu": cpu_model(), "threads": torch.get_num_threads(),
                      "batch_size": args.batch_size, "steps": args.steps, "answer_tokens_per_step": answer_tokens,
                      "pagedllm_s_per_step": round(ours, 3), "transformers_peft_s_per_step": round(peer, 3),
                      "speedup": round(peer / ours, 2)}))


if __name__ == "__main__":
    main()
