"""Hybrid models (issue 36): a Qwen3.5-0.8B-shaped model with random weights — pagedllm against llama.cpp on
one Q4_K_M GGUF file written by tools/convert, and against transformers with 64 requests at once.

    .venv/bin/python benchmarks/hybrid.py [--parts single,batch] [--lengths 100,512,4000] [--rounds 2]
        [--threads 2] [--batch 64] [--dtypes float32,bfloat16] [--intervals 1,4,16,64]

The model: Qwen3.5-0.8B's text shapes (24 layers of hidden 1024, Gated DeltaNet of 16 heads of 128 in three of
every four, gated attention of 8 heads of 256 with 2 kv heads in the rest, MLP 3584, vocabulary 248,320, tied
head), initialised by transformers (`Qwen3_5ForCausalLM`), saved once under ~/.cache/pagedllm-bench; the GGUF
file holds the same weights in a Q4_K_M mix and the default model's tokenizer padded to the vocabulary.

single: for each N, one prompt of N tokens then 64 greedy tokens, each engine in a fresh process
(long_context.py's runs), the engines alternating `--rounds` times and each keeping its best; one JSON line
per N with both engines' prefill and decode rates, the ratios, and the limits (decode: weight bytes + the
attention layers' K/V at N + the states read and written, ÷ read bandwidth; prefill: the matrices' FLOPs +
attention's + the delta rule's, ÷ the GEMM rate); then a line with decode at the longest N over decode at
the shortest (the states do not grow).
batch: `--batch` prompts of 32 tokens, 32 output tokens each (EOS ignored), pagedllm's `LLM.generate` on the
Hugging Face folder against one transformers `generate` over the same batch, same threads, both computing in
each of `--dtypes`.
prefix (not in the default parts): the prefix cache's hits and saved states on a chat workload for each
snapshot interval (prefix_cache).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from llamacpp_peer import cpu_model, ensure_llamacpp  # noqa: E402
from long_context import KV_BYTES, machine_rates, run  # noqa: E402
from vs_llamacpp import CACHE, _padded_tokenizer  # noqa: E402

DECODE, PROMPT, OUTPUT = 64, 32, 32
SHAPE = dict(vocab_size=248320, hidden_size=1024, num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2,
             head_dim=256, intermediate_size=3584, linear_conv_kernel_dim=4, linear_key_head_dim=128,
             linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=16,
             max_position_embeddings=32768, tie_word_embeddings=True, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25})


def hf_folder() -> Path:
    """The Qwen3.5-0.8B-shaped checkpoint (float32), written once."""
    folder = CACHE / "qwen3.5-0.8b-shaped-random"
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, Qwen3_5TextConfig

    from pagedllm.models.loaders import ModelSource, default_model_path
    from pagedllm.tokenizer import load_tokenizer
    from pagedllm.tools.export import write_tokenizer_files

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3_5TextConfig(**SHAPE), dtype=torch.float32)
    model.save_pretrained(folder)
    source = ModelSource("gguf", default_model_path())
    write_tokenizer_files(source, load_tokenizer(source), folder)
    return folder


def q4_k_m_file() -> Path:
    """The same weights as llama.cpp's Q4_K_M mix, through tools/convert's writer."""
    path = CACHE / "qwen3.5-0.8b-shaped-random.Q4_K_M.gguf"
    if path.exists():
        return path
    from pagedllm.models.loaders import ModelSource, default_model_path
    from pagedllm.models.loaders.gguf_file import GGUFFile
    from pagedllm.tools.convert import write_gguf
    from pagedllm.tools.export import canonical_weights

    config, weights = canonical_weights(ModelSource("hf", hf_folder()))
    partial = path.with_suffix(".partial")
    write_gguf(partial, config, weights.items(), _padded_tokenizer(GGUFFile(default_model_path()), config.vocab_size),
               weight_type="q4_k_m")
    partial.rename(path)
    return path


def limits(path: Path, n: int, rates: dict) -> dict:
    """What no engine passes at N here. Decode reads every weight, the attention layers' K/V (float16 in
    both engines' pools here) and each recurrent layer's state, and writes the state back; prefill costs
    2 FLOPs a matrix parameter a token, causal attention's 2 · 2 · heads · head_dim · N²/2 a layer, and the
    chunked delta rule's ~(6 · dk · dv + 4 · 64 · (dk + dv)) a value head a token a layer."""
    from pagedllm.models.loaders import ModelSource
    from pagedllm.tools.memory import memory_report

    report = memory_report(ModelSource("gguf", path))
    c = report.config
    attention = len(c.attention_layers)
    recurrent = c.num_hidden_layers - attention
    kv_bytes = n * 2 * attention * c.num_key_value_heads * c.head_dim * KV_BYTES["float16"]
    step_bytes = report.packed_bytes + kv_bytes + 2 * c.state_bytes_per_sequence
    dk, dv = c.linear_key_head_dim, c.linear_value_head_dim
    matrices = report.num_parameters - c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 0)
    flops = (2 * matrices * n + 2 * attention * c.num_attention_heads * c.head_dim * n * n
             + recurrent * c.linear_num_value_heads * (6 * dk * dv + 4 * 64 * (dk + dv)) * n)
    return {"decode_limit_tok_s": round(rates["read_bandwidth_gb_s"] * 1e9 / step_bytes, 1),
            "prefill_limit_tok_s": round(n / (flops / (rates["gemm_gflop_s"] * 1e9)), 1)}


def single_stream(lengths: list[int], rounds: int, threads: int) -> None:
    path, rates = q4_k_m_file(), machine_rates()
    decode_at = {}
    for n in lengths:
        runs: dict[str, list[dict]] = {"pagedllm": [], "llama.cpp": []}
        for _ in range(rounds):
            runs["pagedllm"].append(run("pagedllm", path, n, DECODE, threads))
            runs["llama.cpp"].append(run("llama.cpp", path, n, DECODE, threads, flash=True))
        best = {engine: {k: max(r[k] for r in rs) for k in ("prefill_tok_s", "decode_tok_s")}
                for engine, rs in runs.items()}
        decode_at[n] = best["pagedllm"]["decode_tok_s"]
        print(json.dumps({"cpu": cpu_model(), "threads": threads, "file": path.name, "n": n, "machine": rates,
                          "pagedllm": best["pagedllm"] | limits(path, n, rates), "llama.cpp fa=on": best["llama.cpp"],
                          "ratio_pagedllm_over_llamacpp": {k: round(best["pagedllm"][k] / best["llama.cpp"][k], 2)
                                                           for k in best["pagedllm"]}}), flush=True)
    short, long = min(decode_at), max(decode_at)
    print(json.dumps({f"pagedllm decode at {long} over decode at {short}": round(decode_at[long] / decode_at[short], 2)}))


def batch(size: int, threads: int, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from pagedllm import LLM, SamplingParams

    torch.set_num_threads(threads)
    folder = hf_folder()
    prompts = torch.randint(100, 49152, (size, PROMPT), generator=torch.Generator().manual_seed(size)).tolist()
    # Room for every sequence's states (19.3 MiB each) and the prefix cache's in half the budget, pages in the rest.
    llm = LLM(str(folder), kv_cache_memory=size * 64 * 2**20, max_num_seqs=size, dtype=dtype)
    assert llm.engine.scheduler.config.max_num_seqs == size
    params = SamplingParams(max_tokens=OUTPUT, temperature=0, ignore_eos=True)
    llm.generate({"prompt_token_ids": prompts[0]}, params)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    ours = sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - start)
    del llm
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(torch.tensor(prompts), max_new_tokens=OUTPUT, min_new_tokens=OUTPUT, do_sample=False,
                          pad_token_id=0)
    peer = (out.shape[1] - PROMPT) * size / (time.perf_counter() - start)
    print(json.dumps({"cpu": cpu_model(), "threads": threads, "dtype": dtype, "batch": size, "prompt": PROMPT,
                      "output": OUTPUT,
                      "pagedllm_tok_s": round(ours, 1), "transformers_tok_s": round(peer, 1),
                      "ratio": round(ours / peer, 2)}), flush=True)


def prefix_cache(intervals: list[int]) -> None:
    """Hybrid prefix caching: the prompt tokens a chat workload finds cached, and the saved states it
    keeps, for each snapshot interval. The workload: 8 conversations of 3 turns over one 320-token system
    prompt (user turns of 20–60 tokens, 32-token answers fed back), one request at a time, blocks of 16, on a
    tiny Qwen3.5 (the
    hits do not depend on the model's size; the memory is given for Qwen3.5-0.8B's 19.3 MiB states)."""
    import random

    from transformers import AutoModelForCausalLM, Qwen3_5TextConfig

    from pagedllm import LLM, SamplingParams
    from pagedllm.models.loaders import ModelSource, default_model_path
    from pagedllm.tokenizer import load_tokenizer
    from pagedllm.tools.export import write_tokenizer_files

    folder = CACHE / "qwen3.5-tiny-random"
    if not (folder / "config.json").exists():
        tiny = dict(SHAPE, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=96, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                    linear_num_value_heads=4, vocab_size=49152)
        AutoModelForCausalLM.from_config(Qwen3_5TextConfig(**tiny)).save_pretrained(folder)
        source = ModelSource("gguf", default_model_path())
        write_tokenizer_files(source, load_tokenizer(source), folder)
    state_mib = 20201472 / 2**20  # Qwen3.5-0.8B's states a sequence
    rng = random.Random(0)
    system = [rng.randrange(100, 40000) for _ in range(320)]
    turns = [[[rng.randrange(100, 40000) for _ in range(rng.randint(20, 60))] for _ in range(3)] for _ in range(8)]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    for interval in intervals:
        llm = LLM(str(folder), kv_cache_memory=256 * 2**20, state_snapshot_interval=interval, max_num_seqs=8)
        cache = llm.engine.kv_cache
        history = [list(system) for _ in turns]
        prompt_tokens = 0
        for turn in range(3):  # each conversation's turn in turn: what the cache can give, not scheduling luck
            for c, conversation in enumerate(turns):
                prompt = history[c] + conversation[turn]
                prompt_tokens += len(prompt)
                output = llm.generate({"prompt_token_ids": prompt}, params)[0]
                history[c] = prompt + list(output.outputs[0].token_ids)
        saved = len(cache.snapshots)
        print(json.dumps({"interval_blocks": interval, "prompt_tokens": prompt_tokens,
                          "hit_tokens": cache.stats.hit_tokens,
                          "hit_share": round(cache.stats.hit_tokens / prompt_tokens, 3),
                          "states_saved_at_end": saved, "their_mib_at_qwen3.5_0.8b": round(saved * state_mib)}),
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="single,batch")
    parser.add_argument("--lengths", default="100,512,4000")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="batch: both engines in each of these")
    parser.add_argument("--intervals", default="1,4,16,64", help="prefix: snapshot intervals (blocks) to compare")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if "single" in parts:
        ensure_llamacpp()
        single_stream([int(n) for n in args.lengths.split(",")], args.rounds, args.threads)
    if "batch" in parts:
        for dtype in args.dtypes.split(","):
            batch(args.batch, args.threads, dtype)
    if "prefix" in parts:
        prefix_cache([int(i) for i in args.intervals.split(",")])


if __name__ == "__main__":
    main()
