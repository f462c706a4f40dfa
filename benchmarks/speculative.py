"""N-gram speculation on a code-editing workload: tokens/s with and without it, same run.

    .venv/bin/python benchmarks/speculative.py [--num-requests 8] [--num-speculative-tokens 4]

Each request asks the default model to rename an identifier in a short seeded Python snippet and
print the whole code, so most of the answer copies the prompt. Greedy, so both runs must give the
same tokens (checked). Prints one JSON line: output tokens/s of each run, the speed-up and the
acceptance rate.
"""

from __future__ import annotations

import argparse
import json
import random
import time

NAMES = ["total", "count", "value", "items", "result", "index", "buffer", "offset"]


def snippet(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.sample(NAMES, 3)
    code = (f"def update_{a}({a}, {b}):\n    {c} = {a} + {b}\n    if {c} > 10:\n        {c} = {c} - 10\n"
            f"    return {c}\n\n\nfor {b} in range(5):\n    print(update_{a}({b} * 2, {b}))\n")
    return code, c


def workload(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        code, name = snippet(rng)
        chats.append([{"role": "user", "content": f"Rename the variable {name} to new_{name} in this code and "
                                                  f"print the whole code:\n\n{code}"}])
    return chats


def run(chats, args, speculative: dict | None) -> tuple[dict, list[list[int]]]:
    from pagedllm import LLM, SamplingParams

    llm = LLM(kv_cache_memory=256 * 2**20, max_num_seqs=args.num_requests, speculative_config=speculative)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    llm.chat(chats[:1], SamplingParams(max_tokens=4, temperature=0))  # warm-up (kernel build, first touches)
    start = time.perf_counter()
    outputs = llm.chat(chats, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outputs)
    stats = llm.engine.stats()
    report = {"elapsed_s": elapsed, "output_tokens": tokens, "output_tok_s": tokens / elapsed,
              "acceptance_rate": stats.spec_acceptance_rate, "draft_tokens": stats.spec_draft_tokens}
    return report, [o.token_ids for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    chats = workload(args.num_requests, args.seed)
    plain, plain_ids = run(chats, args, None)
    spec, spec_ids = run(chats, args, {"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens})
    print(json.dumps({"benchmark": "speculative-ngram", "num_requests": args.num_requests, "plain": plain,
                      "ngram": spec, "speedup": spec["output_tok_s"] / plain["output_tok_s"],
                      "identical_tokens": sum(a == b for a, b in zip(plain_ids, spec_ids))}))


if __name__ == "__main__":
    main()
