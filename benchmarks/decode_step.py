"""Where a one-stream decode step's time goes: the engine's Python, the layers, the output head.

A profiling aid for the decode loop, not a comparison with a peer (benchmarks/vs_llamacpp.py is that):
greedy decode of 128 tokens after a 4-token prompt, wall time per step split between
`ModelRunner.prepare`, `Transformer.forward` (embedding, layers, final norm), the rest of
`ModelRunner.execute` (the head, sampling) and the rest of `LLMEngine.step` (scheduling, outputs).
`--baseline DIR` times another source tree (e.g. a `git worktree` of the previous commit) in
alternation with this one, so that both see the same spells of a shared host.

    .venv/bin/python benchmarks/decode_step.py [--model PATH.gguf] [--baseline DIR] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

TIMED = """
import collections, json, sys, time
import torch
torch.set_num_threads({threads})
from pagedllm import LLM, SamplingParams
from pagedllm.engine import llm_engine, model_runner
from pagedllm.models import transformer

spent = collections.defaultdict(float)
def timed(cls, name, key):
    method = getattr(cls, name)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - start
    setattr(cls, name, wrapper)
timed(transformer.Transformer, "forward", "forward")
timed(model_runner.ModelRunner, "prepare", "prepare")
timed(model_runner.ModelRunner, "execute", "execute")
timed(llm_engine.LLMEngine, "step", "step")

llm = LLM({model!r}, kv_cache_memory=64 * 2**20, enable_prefix_caching=False)
params = SamplingParams(max_tokens=129, temperature=0, ignore_eos=True)
llm.generate({{"prompt_token_ids": [100, 101, 102, 103]}}, SamplingParams(max_tokens=8, temperature=0))
best = None
for _ in range(3):
    spent.clear()
    llm.generate({{"prompt_token_ids": [100, 101, 102, 103]}}, params)
    ms = {{key: 1e3 * value / 129 for key, value in spent.items()}}
    if best is None or ms["step"] < best["step"]:
        best = ms
print(json.dumps({{"step_ms": best["step"], "prepare_ms": best["prepare"], "forward_ms": best["forward"],
                  "head_and_sampling_ms": best["execute"] - best["forward"] - best["prepare"],
                  "engine_rest_ms": best["step"] - best["execute"], "tok_s": 1e3 / best["step"]}}))
"""


def time_tree(src: Path, model: str, threads: int) -> dict:
    """One fresh process on the source tree `src`: the best of three 128-token decodes, per step."""
    env = dict(os.environ, PYTHONPATH=str(src))
    done = subprocess.run([sys.executable, "-c", TIMED.format(model=model, threads=threads)], env=env,
                          capture_output=True, text=True, check=True)
    return {key: round(value, 3) for key, value in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a GGUF file (default: the default model)")
    parser.add_argument("--baseline", type=Path, help="another checkout's src/ (or its root) to time alternately")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from pagedllm.models.loaders import default_model_path

    model = args.model or str(default_model_path())
    trees = {"this": SRC}
    if args.baseline:
        trees["baseline"] = args.baseline / "src" if (args.baseline / "src").is_dir() else args.baseline
    for round_ in range(args.rounds):
        for name, src in trees.items():
            print(json.dumps({"round": round_, "tree": name, **time_tree(src, model, args.threads)}), flush=True)


if __name__ == "__main__":
    main()
