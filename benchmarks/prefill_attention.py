"""The fused prefill attention kernel on its own (issue 35): one chunk of new tokens against a cached
prefix, Qwen2.5-0.5B's attention shape (14 query heads, 2 kv heads, head size 64) over a float16 pool,
against the torch path it replaced (keys gathered through the block table, SDPA with an explicit mask),
and held against the machine's GEMM rate (torch bf16 2048², the same figure long_context.py uses).

    .venv/bin/python benchmarks/prefill_attention.py [--contexts 512,4096,16384] [--chunk 512] [--threads 2]

Prints the CPU and the GEMM rate, then one line per context: each path's time (best of 5) and
GFLOP/s (4 · chunk · visible keys · heads · head size), the fused bfloat16 path's share of the GEMM
rate and its ratio over the torch path.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from llamacpp_peer import cpu_model  # noqa: E402

HEADS, KV_HEADS, DIM, BLOCK = 14, 2, 64, 16


def best_seconds(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def torch_path(q, pool, table, context):
    """What the CPU backend ran for prefill chunks before the fused kernel (backend.TorchBackend)."""
    from pagedllm.attention.kv_cache import cached_values

    keys = cached_values(pool[0][table].flatten(1, 2)[:, :context], torch.float32).transpose(1, 2)
    values = cached_values(pool[1][table].flatten(1, 2)[:, :context], torch.float32).transpose(1, 2)
    positions = torch.arange(context - q.shape[0], context)
    mask = (torch.arange(context)[None, :] <= positions[:, None])[None, None]
    return F.scaled_dot_product_attention(q.unsqueeze(0).transpose(1, 2), keys, values, attn_mask=mask,
                                          scale=DIM**-0.5, enable_gqa=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="512,4096,16384")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from pagedllm import kernels

    if not kernels.quant_kernels_available():
        raise SystemExit("the CPU kernels did not build (see the warning above)")
    a = torch.randn(2048, 2048).to(torch.bfloat16 if kernels.cpu_multiplies_bfloat16() else torch.float32)
    gemm = 2 * 2048**3 / best_seconds(lambda: a @ a) / 1e9
    print(f"CPU: {cpu_model()}, {args.threads} threads; GEMM {gemm:.0f} GFLOP/s ({a.dtype})")
    for context in (int(c) for c in args.contexts.split(",")):
        chunk = min(args.chunk, context)
        blocks = math.ceil(context / BLOCK)
        pool = torch.randn(2, blocks, BLOCK, KV_HEADS, DIM).to(torch.float16)
        table, q = torch.arange(blocks)[None], torch.randn(chunk, HEADS, DIM)
        starts, lens = torch.tensor([0, chunk]), torch.tensor([context])
        flops = 4 * chunk * (context - chunk + (chunk + 1) / 2) * HEADS * DIM
        paths = {"torch": lambda: torch_path(q, pool, table, context),
                 "fused float32": lambda: kernels.paged_prefill_attention(q, pool, table, starts, lens, DIM**-0.5, None)}
        if kernels.prefill_bfloat16_available():
            paths["fused bfloat16"] = lambda: kernels.paged_prefill_attention(q, pool, table, starts, lens, DIM**-0.5,
                                                                              None, bfloat16=True)
        seconds = {name: best_seconds(fn) for name, fn in paths.items()}
        line = "  ".join(f"{name} {s * 1e3:.1f} ms {flops / s / 1e9:.0f} GFLOP/s" for name, s in seconds.items())
        fastest = min(seconds, key=seconds.get)
        print(f"context {context}, chunk {chunk}: {line} | {fastest}: {flops / seconds[fastest] / 1e9 / gemm:.0%} of "
              f"the GEMM rate, {seconds['torch'] / seconds[fastest]:.2f}x the torch path")


if __name__ == "__main__":
    main()
