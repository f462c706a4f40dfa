"""Long context: one prompt of N tokens, then DECODE greedy tokens, pagedllm against llama.cpp (flash
attention on and off) on the same GGUF files, same threads, each run in a fresh process.

For each file and N: prefill and decode rates, RSS at the end, and the limit each figure is held against —
decode: (weight bytes + the KV bytes a step reads at N) ÷ this machine's read bandwidth; prefill: the
prompt's FLOPs (2 · matrix parameters · N plus causal attention's 2 · 2 · layers · heads · head_dim · N²/2)
÷ this machine's GEMM rate (bfloat16 where the CPU multiplies it natively, else float32). Files: the default
model (SmolLM2-135M Q4_1, N up to its 8,192) and a Qwen2.5-0.5B-shaped Q4_K_M mix (vs_llamacpp.py's).

    .venv/bin/python benchmarks/long_context.py [--files default,qwen] [--lengths 512,4096,16384,32768]
        [--kv-dtypes auto] [--peer llama.cpp|none] [--flash on,off] [--decode 64] [--threads 2]

Prints one JSON line per file and N.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from llamacpp_peer import cpu_model, ensure_llamacpp  # noqa: E402
from vs_llamacpp import qwen_shaped_q4_k_m  # noqa: E402

_COMMON = """
import json, time, psutil
import numpy as np
ids = np.random.default_rng(0).integers(100, 10000, N).tolist()
def rss(): return psutil.Process().memory_info().rss / 2**20
"""

# The engine stepped by hand: the first token's time ends the prefill, the rest time the decode.
_PAGEDLLM = """
import torch
torch.set_num_threads(THREADS)
from pagedllm import LLM, SamplingParams
# One sequence; 64 MiB over its pages hold a hybrid's recurrent states (Qwen3.5-0.8B's: 20 MiB).
llm = LLM(PATH, kv_cache_memory=(N + DECODE + 64) * 64 * 1024 + 64 * 2**20, max_model_len=N + DECODE + 16,
          enable_prefix_caching=False, kv_cache_dtype=KV_DTYPE, max_num_seqs=1)
llm.generate({"prompt_token_ids": ids[:64]}, SamplingParams(max_tokens=4, temperature=0))  # warm-up
engine, times = llm.engine, []
engine.add_request("long", {"prompt_token_ids": ids}, SamplingParams(max_tokens=DECODE + 1, temperature=0,
                                                                      ignore_eos=True))
start = time.perf_counter()
while engine.has_unfinished():
    if any(o.outputs[0].token_ids for o in engine.step()):
        times.append(time.perf_counter())
prefill, decode = times[0] - start, times[-1] - times[0]
from pagedllm.engine.llm_engine import kv_pool_dtype
kv = str(kv_pool_dtype(engine.model, KV_DTYPE, torch.float32)).removeprefix("torch.").replace("uint8", "q8_0")
"""

_LLAMACPP = """
from llama_cpp import Llama
llm = Llama(PATH, n_threads=THREADS, n_threads_batch=THREADS, n_ctx=N + DECODE + 16, n_batch=512, n_ubatch=512,
            flash_attn=FLASH, verbose=False)
llm.eval(ids[:64]); llm.reset()  # warm-up
start = time.perf_counter()
llm.eval(ids)
prefill = time.perf_counter() - start
def last_logits(): return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
token = int(np.argmax(last_logits()))
start = time.perf_counter()
for _ in range(DECODE):
    llm.eval([token])
    token = int(np.argmax(last_logits()))
decode = time.perf_counter() - start
kv = "float16"
"""

_REPORT = """
print(json.dumps({"prefill_tok_s": round(N / prefill, 1), "decode_tok_s": round(DECODE / decode, 2),
                  "rss_mib": round(rss()), "kv_dtype": kv}))
"""


def run(engine: str, path: Path, n: int, decode: int, threads: int, kv_dtype: str = "auto",
        flash: bool = True) -> dict:
    body = _PAGEDLLM if engine == "pagedllm" else _LLAMACPP
    header = (f"PATH, N, DECODE, THREADS, KV_DTYPE, FLASH = {str(path)!r}, {n}, {decode}, {threads}, "
              f"{kv_dtype!r}, {flash}\n")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(header) + _COMMON + body + _REPORT],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{engine} on {path.name} at {n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine_rates() -> dict:
    """Read bandwidth (a torch sum over 1 GiB, best of 5) and the GEMM rate (2048², best of 5) here."""
    import torch

    from pagedllm.kernels import cpu_multiplies_bfloat16

    data = torch.ones(2**28)
    bandwidth = data.numel() * 4 / min(_timed(data.sum) for _ in range(5))
    dtype = torch.bfloat16 if cpu_multiplies_bfloat16() else torch.float32
    a = torch.randn(2048, 2048).to(dtype)
    gemm = 2 * 2048**3 / min(_timed(lambda: a @ a) for _ in range(5))
    return {"read_bandwidth_gb_s": round(bandwidth / 1e9, 1), "gemm_gflop_s": round(gemm / 1e9),
            "gemm_dtype": str(dtype).removeprefix("torch.")}


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def limits(path: Path, n: int, rates: dict, kv_bytes_per_value: float) -> dict:
    """What no engine can pass at N on this machine: decode bound by the bytes a step reads, prefill by
    the prompt's FLOPs."""
    from pagedllm.models.loaders import ModelSource
    from pagedllm.tools.memory import memory_report

    report = memory_report(ModelSource("gguf", path))
    c = report.config
    kv_values_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim
    step_bytes = report.packed_bytes + n * kv_values_per_token * kv_bytes_per_value
    matrix_params = report.num_parameters - c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 0)
    flops = 2 * matrix_params * n + 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * n * n
    return {"decode_limit_tok_s": round(rates["read_bandwidth_gb_s"] * 1e9 / step_bytes, 1),
            "prefill_limit_tok_s": round(n / (flops / (rates["gemm_gflop_s"] * 1e9)), 1)}


KV_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "q8_0": 34 / 32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", default="default,qwen")
    parser.add_argument("--lengths", default="512,4096,16384,32768")
    parser.add_argument("--kv-dtypes", default="auto", help="pagedllm's --kv-cache-dtype values to run, comma-separated")
    parser.add_argument("--peer", choices=["llama.cpp", "none"], default="llama.cpp")
    parser.add_argument("--flash", default="on,off", help="llama.cpp's flash attention settings to run (on, off)")
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.peer == "llama.cpp":
        ensure_llamacpp()
    from pagedllm.models.loaders import default_model_path

    rates = machine_rates()
    files = {"default": (default_model_path, 8192), "qwen": (qwen_shaped_q4_k_m, 32768)}
    for key in args.files.split(","):
        make, context = files[key]
        path = make()
        for n in (int(x) for x in args.lengths.split(",")):
            if n + args.decode + 16 > context:
                continue
            ours = {kv: run("pagedllm", path, n, args.decode, args.threads, kv) for kv in args.kv_dtypes.split(",")}
            peers = {} if args.peer == "none" else {
                f"llama.cpp fa={'on' if flash else 'off'}": run("llama.cpp", path, n, args.decode, args.threads,
                                                                 flash=flash)
                for flash in (f == "on" for f in args.flash.split(","))}
            line = {"cpu": cpu_model(), "threads": args.threads, "file": path.name, "n": n, "machine": rates,
                    **{f"pagedllm kv={kv}": {**r, **limits(path, n, rates, KV_BYTES[r["kv_dtype"]])}
                       for kv, r in ours.items()},
                    **peers}
            if peers:
                best = {k: max(p[k] for p in peers.values()) for k in ("prefill_tok_s", "decode_tok_s")}
                line["ratio_over_best_llamacpp"] = {f"kv={kv}": {k: round(r[k] / best[k], 2) for k in best}
                                                    for kv, r in ours.items()}
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
