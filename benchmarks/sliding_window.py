"""A sliding-window model's KV blocks while it generates a long answer (issue 35): every layer keeps to a window
of W tokens, so the blocks a sequence holds should stay near W / block_size however long it runs.

The model: SmolLM2-135M's shape with a sliding window (random weights, Q4_1, written once by tools/convert into
~/.cache/pagedllm-bench). One greedy sequence of --tokens tokens after a short prompt; every --every steps the
blocks in use and the decode rate so far. Prints one JSON line.

    .venv/bin/python benchmarks/sliding_window.py [--window 512] [--tokens 8192] [--block-size 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from llamacpp_peer import cpu_model  # noqa: E402
from vs_llamacpp import cached_random_gguf  # noqa: E402


def windowed_model(window: int) -> Path:
    return cached_random_gguf(f"smollm2-shaped-window{window}-random.Q4_1.gguf", "q4_1", dict(
        family="mistral", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=16384, tie_word_embeddings=True, sliding_window=window))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--every", type=int, default=1024)
    args = parser.parse_args()
    import torch

    from pagedllm import LLM, SamplingParams

    torch.set_num_threads(2)
    path = windowed_model(args.window)
    llm = LLM(str(path), block_size=args.block_size, kv_cache_memory=512 * 2**20, enable_prefix_caching=False,
              max_model_len=args.tokens + 64)
    engine = llm.engine
    engine.add_request("long", {"prompt_token_ids": list(range(100, 132))},
                       SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True))
    held, marks, start, steps = 0, [], time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        stats = engine.stats()
        in_use = stats.kv_blocks_total - stats.kv_blocks_free
        held = max(held, in_use) if steps > 1 else held  # past the prompt's step
        if steps % args.every == 0:
            marks.append({"tokens": steps, "blocks_in_use": in_use,
                          "tok_s": round(steps / (time.perf_counter() - start), 1)})
    print(json.dumps({"cpu": cpu_model(), "model": path.name, "window": args.window, "block_size": args.block_size,
                      "tokens": args.tokens, "most_blocks_in_use": held,
                      "window_blocks": -(-args.window // args.block_size),
                      "without_freeing_would_hold": -(-(32 + args.tokens) // args.block_size), "marks": marks}))


if __name__ == "__main__":
    main()
