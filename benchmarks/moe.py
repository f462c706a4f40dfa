"""Mixture of experts: decode throughput as the batch grows, pagedllm against transformers, same run.

    .venv/bin/python benchmarks/moe.py [--batches 1 4 16 64] [--format f32|q8_0] [--peer hf|none]

A small random Mixtral (hidden 512, 4 layers, 8 experts of 1024, top-2, the default model's vocabulary and tokenizer) built
offline with transformers; with --format q8_0 pagedllm runs it from a Q8_0 GGUF written by
tools/convert (packed experts). Each batch size runs that many sequences of a 32-token prompt and
32 output tokens (EOS ignored) at once; transformers runs one `generate` over the same batch.
Prints the CPU, then one JSON line per batch size: output tokens/s of each and the ratio. Batched
experts (one call per chosen expert a step) should make tokens/s grow with the batch.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

PROMPT, OUTPUT = 32, 32


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def build_model(folder: Path, fmt: str):
    from transformers import AutoModelForCausalLM, MixtralConfig

    from pagedllm.models.loaders import ModelSource, default_model_path, read_model_config
    from pagedllm.models.loaders.gguf_file import GGUFFile
    from pagedllm.tokenizer import load_tokenizer
    from pagedllm.models.loaders.hf_loader import hf_weights
    from pagedllm.tools.convert import write_gguf

    config = MixtralConfig(vocab_size=49152, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=1024)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    hf.save_pretrained(folder)
    default = default_model_path()
    tokenizer = load_tokenizer(ModelSource("gguf", default))
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": tokenizer.id_to_token(tokenizer.eos_token_id)}))
    if fmt == "f32":
        return hf, str(folder)
    ours, _ = read_model_config(ModelSource("hf", folder))
    path = folder / f"moe-{fmt}.gguf"
    metadata = {k: v for k, v in GGUFFile(default).metadata.items() if k.startswith("tokenizer.")}
    write_gguf(path, ours, hf_weights(folder), metadata, weight_type=fmt)
    return hf, str(path)


def prompts(batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(100, 49152, (batch, PROMPT), generator=g).tolist()


def run_pagedllm(llm, batch: int) -> float:
    from pagedllm import SamplingParams

    params = SamplingParams(max_tokens=OUTPUT, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts(batch)], params)
    return sum(len(o.token_ids) for o in outputs) / (time.perf_counter() - start)


def run_hf(hf, batch: int) -> float:
    ids = torch.tensor(prompts(batch))
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=OUTPUT, min_new_tokens=OUTPUT, do_sample=False, pad_token_id=0)
    return (out.shape[1] - PROMPT) * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--format", choices=["f32", "q8_0"], default="f32")
    parser.add_argument("--peer", choices=["hf", "none"], default="hf")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from pagedllm import LLM

    print(json.dumps({"cpu": cpu_model(), "threads": torch.get_num_threads(), "format": args.format}))
    with tempfile.TemporaryDirectory() as tmp:
        hf, model = build_model(Path(tmp), args.format)
        llm = LLM(model, kv_cache_memory=256 * 2**20, max_num_seqs=max(args.batches))
        run_pagedllm(llm, 1)  # warm-up: kernels built, caches touched
        for batch in args.batches:
            ours = run_pagedllm(llm, batch)
            row = {"batch": batch, "pagedllm_tok_s": round(ours, 1)}
            if args.peer == "hf":
                peer = run_hf(hf, batch)
                row |= {"transformers_tok_s": round(peer, 1), "ratio": round(ours / peer, 2)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
