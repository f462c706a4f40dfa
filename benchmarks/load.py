"""Load time of a model: pagedllm against transformers (and llama.cpp where installed), same run.

    .venv/bin/python benchmarks/load.py [--model PATH.gguf] [--skip-peers]

Prints one JSON line. Each measurement runs in a fresh interpreter so imports are counted:
`first_token_s` is command start → first generated token, as a user of `pagedllm generate` sees it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

PAGEDLLM = """
import time; t0 = time.perf_counter()
from pagedllm import LLM, SamplingParams
t1 = time.perf_counter()
llm = LLM({model!r})
t2 = time.perf_counter()
llm.generate("Hi", SamplingParams(max_tokens=1, temperature=0))
t3 = time.perf_counter()
import json, resource
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1, "first_token_s": t3 - t0,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

TRANSFORMERS = """
import time; t0 = time.perf_counter()
import os, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
t1 = time.perf_counter()
path = {model!r}
model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
t2 = time.perf_counter()
model.generate(torch.tensor([tok.encode("Hi")]), max_new_tokens=1, do_sample=False)
t3 = time.perf_counter()
import json, resource
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1, "first_token_s": t3 - t0,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

LLAMA_CPP = """
import time; t0 = time.perf_counter()
from llama_cpp import Llama
t1 = time.perf_counter()
llm = Llama(model_path={model!r}, verbose=False)
t2 = time.perf_counter()
llm("Hi", max_tokens=1)
t3 = time.perf_counter()
import json, resource
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1, "first_token_s": t3 - t0,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def run(code: str, model: str) -> dict | None:
    result = subprocess.run([sys.executable, "-c", code.format(model=model)], capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="a .gguf file (default: the bundled SmolLM2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-peers", action="store_true")
    args = parser.parse_args()
    if args.model is None:
        from pagedllm.models.loaders import default_model_path

        args.model = str(default_model_path())
    best = lambda runs: min(runs, key=lambda r: r.get("first_token_s", float("inf")))  # noqa: E731
    report = {"benchmark": "load", "model": args.model,
              "pagedllm": best([run(PAGEDLLM, args.model) for _ in range(args.repeats)])}
    if not args.skip_peers:
        report["transformers"] = run(TRANSFORMERS, args.model)
        try:
            import llama_cpp  # noqa: F401

            report["llama_cpp"] = best([run(LLAMA_CPP, args.model) for _ in range(args.repeats)])
        except ImportError:
            report["llama_cpp"] = "not installed"
        if "first_token_s" in report["transformers"]:
            report["speedup_vs_transformers"] = report["transformers"]["first_token_s"] / report["pagedllm"]["first_token_s"]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
