"""Batch jobs: `pagedllm.infer` with 1 replica × 2 threads and 2 replicas × 1 thread, against a
naive loop of transformers `generate` over the same rows, in one run.

    .venv/bin/python benchmarks/batch.py [--num-rows 32] [--peer hf|none]

A seeded JSONL file of rows: prompts of 32–256 token ids, 16–96 output tokens each (EOS ignored,
so every side does the same work), greedy. Prints one JSON line: per configuration the wall time
(start-up included), the start-up, rows/s and output tokens/s over the generation time, and the
ratio of each pagedllm configuration to the peer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path


def write_rows(path: Path, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = [{"id": i, "prompt": [rng.randrange(1000, 40000) for _ in range(rng.randint(32, 256))],
             "max_tokens": rng.randint(16, 96), "ignore_eos": True} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def run_pagedllm(model: str | None, data: Path, workers: int, threads: int) -> dict:
    from pagedllm import SamplingParams, infer

    with tempfile.TemporaryDirectory() as tmp:
        summary = infer(model, data, Path(tmp) / "out.jsonl", workers, threads_per_worker=threads,
                        sampling_params=SamplingParams(temperature=0.0, max_tokens=16), progress=False)
    assert summary.errors == 0, summary
    return {"workers": workers, "threads_per_worker": threads, "wall_s": summary.wall_time_s,
            "startup_s": summary.startup_s, "rows": summary.written, "output_tokens": summary.completion_tokens,
            "rows_s": summary.rows_per_s, "output_tok_s": summary.tokens_per_s}


def run_hf_loop(model: str | None, rows: list[dict], threads: int) -> dict:
    """One `generate` call per row, in order: what a first script over a JSONL file does."""
    import torch
    from transformers import AutoModelForCausalLM

    from pagedllm.models.loaders import default_model_path

    torch.set_num_threads(threads)
    start = time.perf_counter()
    path = model or str(default_model_path())
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    loaded = time.perf_counter()
    tokens = 0
    with torch.no_grad():
        for row in rows:
            n = row["max_tokens"]
            out = hf.generate(torch.tensor([row["prompt"]]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)
            tokens += out.shape[1] - len(row["prompt"])
    done = time.perf_counter()
    return {"threads": threads, "wall_s": done - start, "startup_s": loaded - start, "rows": len(rows),
            "output_tokens": tokens, "rows_s": len(rows) / (done - loaded), "output_tok_s": tokens / (done - loaded)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2 GGUF")
    parser.add_argument("--num-rows", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peer", choices=["hf", "none"], default="hf")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.jsonl"
        rows = write_rows(data, args.num_rows, args.seed)
        report = {"benchmark": "batch", "rows": len(rows), "cores": cores,
                  "prompt_tokens": sum(len(r["prompt"]) for r in rows),
                  "1x2": run_pagedllm(args.model, data, 1, 2), "2x1": run_pagedllm(args.model, data, 2, 1)}
    if args.peer == "hf":
        report["hf_loop"] = run_hf_loop(args.model, rows, 2)
        for config in ("1x2", "2x1"):
            report[f"ratio_{config}_output_tok_s"] = report[config]["output_tok_s"] / report["hf_loop"]["output_tok_s"]
            report[f"ratio_{config}_wall"] = report["hf_loop"]["wall_s"] / report[config]["wall_s"]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
