"""The paged decode attention kernel on its own (issue 35): one sequence's decode step over LAYERS layers
of Qwen2.5-0.5B's attention shape (14 query heads, 2 kv heads, head size 64), each layer's K/V pool its own
allocation, for every pool dtype, with float32 products and (where the CPU has AVX-512 BF16) bfloat16
products; held against the bytes a step reads ÷ this machine's read bandwidth (long_context.py's figure).
The two product paths alternate, best of REPEATS each, since the host's speed drifts between runs.

    .venv/bin/python benchmarks/decode_attention.py [--contexts 4096,16384] [--layers 24] [--threads 2]

Prints the CPU and read bandwidth, then per context and pool dtype: ms a step for each path, the share of
the bandwidth limit the faster reaches, and bfloat16's speed-up over float32.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from llamacpp_peer import cpu_model  # noqa: E402
from long_context import machine_rates  # noqa: E402

HEADS, KV_HEADS, DIM, BLOCK = 14, 2, 64, 16
POOLS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "q8_0": torch.uint8}


def make_pools(context: int, layers: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Each layer's pool allocated as the engine allocates it (its own huge-page mapping)."""
    from pagedllm.attention.kv_cache import quantize_q8_0
    from pagedllm.engine.model_runner import _zeroed_pool

    blocks = math.ceil(context / BLOCK)
    pools = []
    for _ in range(layers):
        values = torch.randn(2, blocks, BLOCK, KV_HEADS, DIM)
        values = quantize_q8_0(values) if dtype == torch.uint8 else values.to(dtype)
        pools.append(_zeroed_pool(values.shape, values.dtype, torch.device("cpu")).copy_(values))
    return pools


def step_seconds(pools, q, table, lens, bfloat16: bool) -> float:
    from pagedllm import kernels

    start = time.perf_counter()
    for pool in pools:
        kernels.paged_decode_attention(q, pool, table, lens, DIM**-0.5, None, **({"bfloat16": True} if bfloat16 else {}))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="4096,16384")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--pools", default=",".join(POOLS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from pagedllm import kernels

    if not kernels.cpu_kernels_available():
        raise SystemExit("the CPU kernels did not build (see the warning above)")
    bandwidth = machine_rates()["read_bandwidth_gb_s"] * 1e9
    paths = [False, True] if getattr(kernels, "decode_bfloat16_available", bool)() else [False]
    print(f"CPU: {cpu_model()}, {args.threads} threads; read bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"{args.layers} layers of {HEADS} heads / {KV_HEADS} kv heads / head size {DIM}")
    for context in (int(c) for c in args.contexts.split(",")):
        table = torch.arange(math.ceil(context / BLOCK))[None]
        q, lens = torch.randn(1, HEADS, DIM), torch.tensor([context])
        for name in args.pools.split(","):
            pools = make_pools(context, args.layers, POOLS[name])
            best = {path: math.inf for path in paths}
            for _ in range(args.repeats):  # the paths alternate
                for path in paths:
                    best[path] = min(best[path], step_seconds(pools, q, table, lens, path))
            step_bytes = sum(pool[:, :, :, :, :].numel() * pool.element_size() for pool in pools) * context / (
                table.shape[1] * BLOCK)
            fastest = min(best.values())
            line = "  ".join(f"{'bfloat16' if p else 'float32'} products {s * 1e3:.2f} ms" for p, s in best.items())
            ratio = f", bfloat16 {best[False] / best[True]:.2f}x float32" if True in best else ""
            print(f"context {context}, {name} pool: {line} | {step_bytes / 1e6:.0f} MB a step, fastest at "
                  f"{step_bytes / fastest / 1e9:.1f} GB/s = {step_bytes / fastest / bandwidth:.0%} of the limit{ratio}")


if __name__ == "__main__":
    main()
