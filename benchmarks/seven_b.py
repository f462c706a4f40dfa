"""A 7B-shaped Q4_0 model (random weights, ~3.9 GB) that pagedllm loads and decodes on a 24 GiB machine.

Llama-2-7B's shape (hidden 4096, 32 layers, 32 heads, MLP 11008, untied head) with the default
model's tokenizer, so its vocabulary is 49,152 rather than 32,000 (7.1B parameters). Written once by
pagedllm.tools.convert to ~/.cache/pagedllm-bench (a few minutes), then each engine in a fresh process:
load time, RSS after load, prefill of 128 tokens and greedy decode of 32 (once each: ~1 minute).

    .venv/bin/python benchmarks/seven_b.py [--threads 2] [--no-peer]

Not part of CI. Prints one JSON line with both engines (llama.cpp from benchmarks/llamacpp_peer.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from llamacpp_peer import cpu_model, ensure_llamacpp  # noqa: E402
from vs_llamacpp import cached_random_gguf, run_engine  # noqa: E402


def llama_7b_shaped_q4_0() -> Path:
    return cached_random_gguf("llama-7b-shaped-random.Q4_0.gguf", "q4_0", dict(
        family="llama", vocab_size=49152, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=4096, tie_word_embeddings=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true", help="run pagedllm only")
    args = parser.parse_args()
    path = llama_7b_shaped_q4_0()
    engines = ["pagedllm"] if args.no_peer else ["pagedllm", "llama.cpp"]
    if not args.no_peer:
        ensure_llamacpp()
    # KV in float32 is 1 MiB a token at this shape: 512 MiB hold the 160 tokens.
    results = {e: run_engine(e, path, args.threads, prompt_len=128, decode_len=32, repeats=1, kv_mib=512) for e in engines}
    print(json.dumps({"cpu": cpu_model(), "threads": args.threads, "file": path.name,
                      "file_mib": round(path.stat().st_size / 2**20, 1), **results}), flush=True)


if __name__ == "__main__":
    main()
