"""Offline throughput: pagedllm against Hugging Face transformers static batches, same run.

    .venv/bin/python benchmarks/throughput.py [--num-requests 200] [--peer hf] [--hf-batch-size 16]

A seeded synthetic workload: prompt lengths 32–512, output lengths 16–256, 30% of requests
share a 256-token system prompt. Every request generates exactly its output length (EOS
ignored) so both engines do the same work. Prints one JSON line with output tokens/s,
requests/s, TTFT and time-per-output-token percentiles, and the ratio to the peer.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np


def workload(n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    system = [rng.randrange(1000, 40000) for _ in range(256)]
    requests = []
    for _ in range(n):
        length = rng.randint(32, 512)
        if rng.random() < 0.3:
            prompt = system + [rng.randrange(1000, 40000) for _ in range(max(0, length - 256))]
        else:
            prompt = [rng.randrange(1000, 40000) for _ in range(length)]
        requests.append((prompt, rng.randint(16, 256)))
    return requests


def percentiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)} if values else {}


def run_pagedllm(requests, args) -> dict:
    from pagedllm import LLM, SamplingParams

    llm = LLM(args.model, kv_cache_memory=args.kv_cache_memory, max_num_batched_tokens=args.max_num_batched_tokens,
              max_num_seqs=args.max_num_seqs)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, n in requests]
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p, _ in requests], params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outputs)
    ttft = [o.metrics.time_to_first_token for o in outputs]
    tpot = [(o.metrics.finish_time - o.metrics.first_token_time) / max(1, len(o.token_ids) - 1) for o in outputs]
    return {"elapsed_s": elapsed, "output_tokens": tokens, "output_tok_s": tokens / elapsed,
            "requests_s": len(outputs) / elapsed, "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot),
            "prefix_cache_hit_rate": llm.engine.stats().prefix_cache_hit_rate,
            "preemptions": llm.engine.scheduler.num_preemptions}


def run_hf(requests, args) -> dict:
    """transformers `generate` over static batches in arrival order, left-padded; a batch runs
    until its longest request is done, as a static batcher must."""
    import os

    import torch
    from transformers import AutoModelForCausalLM

    from pagedllm.models.loaders import default_model_path

    path = args.model or str(default_model_path())
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    start = time.perf_counter()
    ttft, latency, tokens = [], [], 0
    for i in range(0, len(requests), args.hf_batch_size):
        batch = requests[i:i + args.hf_batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        longest = max(n for _, n in batch)
        batch_start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                           do_sample=False, pad_token_id=0)
        done = time.perf_counter()
        per_token = (done - batch_start) / longest
        ttft += [batch_start - start + per_token] * len(batch)  # first token ≈ one step after the batch starts
        latency += [done - start] * len(batch)
        tokens += sum(n for _, n in batch)
    elapsed = time.perf_counter() - start
    return {"elapsed_s": elapsed, "output_tokens": tokens, "output_tok_s": tokens / elapsed,
            "requests_s": len(requests) / elapsed, "ttft_s": percentiles(ttft), "latency_s": percentiles(latency),
            "batch_size": args.hf_batch_size}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2 GGUF")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peer", choices=["hf", "none"], default="hf")
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--kv-cache-memory", type=int, default=2 * 2**30)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    args = parser.parse_args()
    requests = workload(args.num_requests, args.seed)
    report = {"benchmark": "throughput", "num_requests": len(requests),
              "prompt_tokens": sum(len(p) for p, _ in requests), "pagedllm": run_pagedllm(requests, args)}
    if args.peer == "hf":
        report["hf"] = run_hf(requests, args)
        report["ratio_output_tok_s"] = report["pagedllm"]["output_tok_s"] / report["hf"]["output_tok_s"]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
