"""pagedllm against llama.cpp on the same GGUF files, same thread count, in one run.

For each file, each engine runs in a fresh process: load time, RSS after load, prefill of 512
tokens (best of 3, new tokens each time) and one-stream greedy decode of 128 tokens (best of 3).
The engines alternate `--rounds` times and each keeps its best figures: this host's memory
bandwidth swings with its neighbours' load, and a single back-to-back pair can catch one engine
in a slow spell.
Files: the default model (SmolLM2-135M Q4_1) and a Qwen2.5-0.5B-shaped model with a Q4_K_M mix
(random weights, written by pagedllm.tools.convert; cached under ~/.cache/pagedllm-bench).

    .venv/bin/python benchmarks/vs_llamacpp.py [--threads 2] [--files default,qwen] [--rounds 2]

llama.cpp comes from benchmarks/llamacpp_peer.py (built once for this CPU). Prints one JSON line
per file with both engines and the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from llamacpp_peer import cpu_model, ensure_llamacpp  # noqa: E402

CACHE = Path.home() / ".cache" / "pagedllm-bench"
PROMPT_LEN, DECODE_LEN, REPEATS = 512, 128, 3

_COMMON = """
import json, os, sys, time, psutil
import numpy as np
rng = np.random.default_rng(0)
def prompts(n): return [rng.integers(100, 10000, PROMPT_LEN).tolist() for _ in range(n)]
def rss(): return psutil.Process().memory_info().rss / 2**20
"""

_PAGEDLLM = """
import torch
torch.set_num_threads(THREADS)
from pagedllm import LLM, SamplingParams
from pagedllm.kernels import quant_kernels_available
quant_kernels_available()  # the kernel build is cached; loading it is not model loading
start = time.perf_counter()
llm = LLM(PATH, kv_cache_memory=KV_MIB * 2**20, max_num_batched_tokens=PROMPT_LEN, enable_prefix_caching=False)
load_s = time.perf_counter() - start
rss_load = rss()
def run(ids, n):
    t = time.perf_counter()
    llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    return time.perf_counter() - t
run(prompts(1)[0][:64], 4)  # warm-up
prefill = min(run(p, 1) for p in prompts(REPEATS))
decode = min(run(p[:4], DECODE_LEN + 1) - run(p[:4], 1) for p in prompts(REPEATS))
"""

# Greedy decode of DECODE_LEN tokens after `ids` through llama-cpp-python's eval loop (also benchmarks/lora_decode.py).
LLAMACPP_DECODE_ONCE = """
def decode_once(ids):
    llm.reset()
    llm.eval(ids)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t = time.perf_counter()
    for _ in range(DECODE_LEN):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return time.perf_counter() - t
"""

_LLAMACPP = """
from llama_cpp import Llama
start = time.perf_counter()
llm = Llama(PATH, n_threads=THREADS, n_threads_batch=THREADS, n_ctx=1024, n_batch=PROMPT_LEN, verbose=False)
load_s = time.perf_counter() - start
rss_load = rss()
def prefill_once(ids):
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    return time.perf_counter() - t
""" + LLAMACPP_DECODE_ONCE + """
prefill_once(prompts(1)[0][:64])
prefill = min(prefill_once(p) for p in prompts(REPEATS))
decode = min(decode_once(p[:4]) for p in prompts(REPEATS))
"""

_REPORT = """
print(json.dumps({"load_s": round(load_s, 3), "rss_after_load_mib": round(rss_load),
                  "peak_rss_mib": round(psutil.Process().memory_info().rss / 2**20),
                  "prefill_tok_s": round(PROMPT_LEN / prefill, 1), "decode_tok_s": round(DECODE_LEN / decode, 1)}))
"""


def run_engine(engine: str, path: Path, threads: int, prompt_len: int = PROMPT_LEN, decode_len: int = DECODE_LEN,
               repeats: int = REPEATS, kv_mib: int = 64) -> dict:
    """One engine on one file in a fresh process: load time, RSS, prefill and decode rates."""
    body = _PAGEDLLM if engine == "pagedllm" else _LLAMACPP
    script = textwrap.dedent(f"PATH, THREADS, PROMPT_LEN, DECODE_LEN, REPEATS, KV_MIB = {str(path)!r}, {threads}, "
                             f"{prompt_len}, {decode_len}, {repeats}, {kv_mib}\n") + _COMMON + body + _REPORT
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{engine} on {path.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def best_of(runs: list[dict]) -> dict:
    """Each figure at its best over several runs of one engine: highest rates, lowest times and sizes."""
    return {k: (max if k.endswith("tok_s") else min)(run[k] for run in runs) for k in runs[0]}


def interleaved_rounds(path: Path, threads: int, rounds: int) -> tuple[dict, dict]:
    """pagedllm and llama.cpp on one file, alternating, `rounds` times each: their best figures."""
    runs: dict[str, list[dict]] = {"pagedllm": [], "llama.cpp": []}
    for _ in range(rounds):
        for engine, results in runs.items():
            results.append(run_engine(engine, path, threads))
    return best_of(runs["pagedllm"]), best_of(runs["llama.cpp"])


def qwen_shaped_q4_k_m() -> Path:
    """Qwen2.5-0.5B's shape (tied head, q/k/v biases) with random weights, as a Q4_K_M mix."""
    return cached_random_gguf("qwen2.5-0.5b-shaped-random.Q4_K_M.gguf", "q4_k_m", dict(
        family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=32768, tie_word_embeddings=True, attention_bias=True))


def cached_random_gguf(name: str, weight_type: str, shape: dict) -> Path:
    """A GGUF file of random weights of `shape` (ModelConfig fields) and the default model's
    tokenizer padded to its vocabulary, written once by tools/convert into CACHE."""
    path = CACHE / name
    if path.exists():
        return path
    import torch

    from pagedllm.config import ModelConfig
    from pagedllm.models.loaders import default_model_path
    from pagedllm.models.loaders.gguf_file import GGUFFile
    from pagedllm.tools.convert import write_gguf

    config = ModelConfig(**shape)
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    write_gguf(partial, config, random_weights(config, torch),
               _padded_tokenizer(GGUFFile(default_model_path()), config.vocab_size), weight_type=weight_type)
    partial.rename(path)
    return path


def random_weights(c, torch):
    """Random weights of a llama-family shape, one tensor at a time (only the quantised blocks
    accumulate in the writer); q/k/v biases where the config has them, lm_head where untied."""
    gen = torch.Generator().manual_seed(0)
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    yield "model.embed_tokens.weight", torch.randn(c.vocab_size, c.hidden_size, generator=gen) * 0.02
    yield "model.norm.weight", torch.ones(c.hidden_size)
    if not c.tie_word_embeddings:
        yield "lm_head.weight", torch.randn(c.vocab_size, c.hidden_size, generator=gen) * 0.02
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (q, c.hidden_size), "self_attn.k_proj": (kv, c.hidden_size),
                  "self_attn.v_proj": (kv, c.hidden_size), "self_attn.o_proj": (c.hidden_size, q),
                  "mlp.gate_proj": (c.intermediate_size, c.hidden_size), "mlp.up_proj": (c.intermediate_size, c.hidden_size),
                  "mlp.down_proj": (c.hidden_size, c.intermediate_size)}
        for name, shape in shapes.items():
            yield p + name + ".weight", torch.randn(*shape, generator=gen) * 0.02
        if c.attention_bias:
            for name, size in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                yield p + f"self_attn.{name}.bias", torch.zeros(size)
        yield p + "input_layernorm.weight", torch.ones(c.hidden_size)
        yield p + "post_attention_layernorm.weight", torch.ones(c.hidden_size)


def _padded_tokenizer(f, vocab_size: int) -> dict:
    """The default model's tokenizer, padded with unused tokens to the embedding's rows."""
    meta = {k: v for k, v in f.metadata.items() if k.startswith("tokenizer.")}
    tokens = list(meta["tokenizer.ggml.tokens"])
    extra = vocab_size - len(tokens)
    meta["tokenizer.ggml.tokens"] = tokens + [f"<|unused_{i}|>" for i in range(extra)]
    if "tokenizer.ggml.token_type" in meta:
        meta["tokenizer.ggml.token_type"] = [int(t) for t in meta["tokenizer.ggml.token_type"]] + [5] * extra  # unused
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--files", default="default,qwen")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternate the engines this many times per file and keep each one's best figures "
                             "(this host's memory bandwidth moves with its neighbours)")
    args = parser.parse_args()
    ensure_llamacpp()
    from pagedllm.models.loaders import default_model_path

    files = {"default": default_model_path, "qwen": qwen_shaped_q4_k_m}
    for key in args.files.split(","):
        path = files[key]()
        ours, peer = interleaved_rounds(path, args.threads, args.rounds)
        ratios = {k: round(ours[k] / peer[k], 2) for k in ("prefill_tok_s", "decode_tok_s", "rss_after_load_mib",
                                                           "load_s")}
        print(json.dumps({"cpu": cpu_model(), "threads": args.threads, "file": path.name,
                          "file_mib": round(path.stat().st_size / 2**20, 1), "pagedllm": ours, "llama.cpp": peer,
                          "ratio_pagedllm_over_llamacpp": ratios}), flush=True)


if __name__ == "__main__":
    main()
