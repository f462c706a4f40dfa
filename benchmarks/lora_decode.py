"""One-stream decode with a LoRA adapter: pagedllm against llama.cpp, same GGUF model, same GGUF LoRA file.

The default model (SmolLM2-135M Q4_1) and a random rank-16 adapter on every projection (q/k/v/o,
gate/up/down), written once as a llama.cpp GGUF LoRA (`blk.N.attn_q.weight.lora_a` …), which both engines
load. Each engine in a fresh process, 2 threads: greedy decode of 128 tokens after a 4-token prompt (best
of 3), without and with the adapter. Prints one JSON line: tok/s per engine and case, and the ratios.

    .venv/bin/python benchmarks/lora_decode.py [--threads 2] [--rank 16]
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
from vs_llamacpp import LLAMACPP_DECODE_ONCE  # noqa: E402

CACHE = Path.home() / ".cache" / "pagedllm-bench"
DECODE_LEN, REPEATS = 128, 3

_COMMON = """
import json, time
import numpy as np
rng = np.random.default_rng(0)
def prompt(): return rng.integers(100, 10000, 4).tolist()
"""

_PAGEDLLM = """
import torch
torch.set_num_threads(THREADS)
from pagedllm import LLM, SamplingParams
llm = LLM(MODEL, kv_cache_memory=64 * 2**20, enable_lora=True, lora_modules={"a": LORA} if LORA else None)
def run(ids, n):
    t = time.perf_counter()
    llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                 lora="a" if LORA else None)
    return time.perf_counter() - t
run(prompt(), 4)
decode = min(run(p, DECODE_LEN + 1) - run(p, 1) for p in (prompt() for _ in range(REPEATS)))
"""

_LLAMACPP = """
from llama_cpp import Llama
options = {"lora_path": LORA} if LORA else {}
llm = Llama(MODEL, n_threads=THREADS, n_threads_batch=THREADS, n_ctx=512, verbose=False, **options)
""" + LLAMACPP_DECODE_ONCE + """
decode_once(prompt())
decode = min(decode_once(prompt()) for _ in range(REPEATS))
"""


def random_gguf_lora(model: Path, rank: int) -> Path:
    """A rank-`rank` adapter with random A and B on every projection of `model`, as llama.cpp's
    convert_lora_to_gguf.py lays it out, written once into CACHE."""
    path = CACHE / f"{model.stem}.random-r{rank}.lora.gguf"
    if path.exists():
        return path
    import numpy as np
    from gguf import GGUFWriter

    from pagedllm.models.loaders import ModelSource, read_model_config
    from pagedllm.tools.convert import gguf_name

    config, family = read_model_config(ModelSource("gguf", model))
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    h, inter = config.hidden_size, config.intermediate_size
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
              "mlp.down_proj": (h, inter)}
    rng = np.random.default_rng(0)
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    writer = GGUFWriter(str(partial), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    for layer in range(config.num_hidden_layers):
        for module, (rows, cols) in shapes.items():
            name = gguf_name(f"model.layers.{layer}.{module}.weight", family)
            writer.add_tensor(f"{name}.lora_a", (rng.standard_normal((rank, cols)) * 0.01).astype(np.float32))
            writer.add_tensor(f"{name}.lora_b", (rng.standard_normal((rows, rank)) * 0.01).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(path)
    return path


def decode_rate(engine: str, model: Path, lora: Path | None, threads: int) -> float:
    body = _PAGEDLLM if engine == "pagedllm" else _LLAMACPP
    script = textwrap.dedent(f"MODEL, LORA, THREADS, DECODE_LEN, REPEATS = {str(model)!r}, "
                             f"{str(lora) if lora else None!r}, {threads}, {DECODE_LEN}, {REPEATS}\n") + _COMMON + body \
        + "\nprint(json.dumps(DECODE_LEN / decode))\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{engine} failed:\n{out.stderr[-3000:]}")
    return round(json.loads(out.stdout.strip().splitlines()[-1]), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    ensure_llamacpp()
    from pagedllm.models.loaders import default_model_path

    model = Path(default_model_path())
    lora = random_gguf_lora(model, args.rank)
    rates = {engine: {case: decode_rate(engine, model, path, args.threads)
                      for case, path in (("base", None), (f"lora_r{args.rank}", lora))}
             for engine in ("pagedllm", "llama.cpp")}
    ratios = {case: round(rates["pagedllm"][case] / rates["llama.cpp"][case], 2) for case in rates["pagedllm"]}
    print(json.dumps({"cpu": cpu_model(), "threads": args.threads, "model": model.name, "decode_tok_s": rates,
                      "ratio_pagedllm_over_llamacpp": ratios}))


if __name__ == "__main__":
    main()
