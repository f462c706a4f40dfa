"""The packed-weight kernels on their own: one product per format and shape, hot in cache.

    .venv/bin/python benchmarks/kernel_rates.py [--rows 1,4] [--threads 2]

Shapes are SmolLM2's (q/k/v, o, gate/up, down, head) and Qwen2.5-0.5B's MLP; random blocks of each
format. Prints the CPU, then one line per (format, shape, activation rows): the median time and the
weight bytes read per second — the figure to hold against the machine's memory bandwidth.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

sys.path.insert(0, str(Path(__file__).parent))
from llamacpp_peer import cpu_model  # noqa: E402

SHAPES = {"qkv 960x576": (960, 576), "o 576x576": (576, 576), "gate_up 3072x576": (3072, 576),
          "down 576x1536": (576, 1536), "head 49152x576": (49152, 576), "qwen gate_up 9728x896": (9728, 896),
          "qwen down 896x4864": (896, 4864)}
FORMATS = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K)


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,4")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from pagedllm.kernels import ISA_NAMES, best_isa, quant_kernels_available
    from pagedllm.layers.quant import random_blocks

    if not quant_kernels_available():
        raise SystemExit("the packed-weight kernels did not build (a C++ compiler is needed)")
    ops, isa = torch.ops.pagedllm_quant, ISA_NAMES.index(best_isa())
    print(f"cpu: {cpu_model()}, path: {best_isa()}, threads: {args.threads}")
    for qtype in FORMATS:
        for name, (n, k) in SHAPES.items():
            if k % (256 if qtype in (Q.Q4_K, Q.Q6_K) else 32):
                continue
            w = torch.from_numpy(random_blocks(qtype, n, k, np.random.default_rng(0)).reshape(n, -1))
            for m in (int(r) for r in args.rows.split(",")):
                x, out = torch.randn(m, k), torch.empty(m, n)
                xq = ops.quantize_q8(x, isa)
                repeats = 30 if n > 10000 else 200
                t8 = median_seconds(lambda: ops.matmul_q8(xq, [w], [int(qtype)], k, out, isa), repeats)
                t15 = median_seconds(lambda: ops.matmul_q15(x, [w], [int(qtype)], k, out, isa), repeats)
                print(f"{qtype.name:5s} {name:22s} rows={m:<3d} int8 {t8 * 1e6:8.1f} us {w.numel() / t8 / 1e9:6.1f} GB/s"
                      f"   15-bit (head) {t15 * 1e6:8.1f} us", flush=True)


if __name__ == "__main__":
    main()
