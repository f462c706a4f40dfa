"""pagedllm on a GPU against Hugging Face transformers, same run: one-stream decode, prefill of 512
tokens and the offline throughput workload (benchmarks/throughput.py), plus batch-1 decode as a
fraction of the memory-bandwidth limit (weight bytes × tokens/s ÷ the device's measured copy
bandwidth).

    python benchmarks/gpu.py [--shape qwen2.5-0.5b] [--quantization none int8 int4] [--num-requests 200]

The GPU machine reaches no network, so the model is built there with random weights in the shape
of a real one (`--shape`; `--model PATH` takes a checkpoint instead): speed does not depend on the
values, and every request generates exactly its length (EOS ignored) in both engines.
`--device cpu --shape tiny` runs the whole script on the CPU as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from throughput import percentiles, workload  # noqa: E402

SHAPES = {  # transformers config fields of the models these figures stand for
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1e6),
    "llama-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=5e5),
    "tiny": dict(model_type="llama", vocab_size=48000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
}


def random_checkpoint(shape: str, dtype: torch.dtype, folder: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(SHAPES[shape])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(folder)
    save_word_tokenizer(folder, config.vocab_size)
    return folder


def save_word_tokenizer(folder: Path, vocab_size: int) -> None:
    """One word per id (the benchmark sends token ids; outputs are detokenised all the same)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w1", "eos_token": "w2"}))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str) -> float:
    """Bytes per second a large device-to-device copy moves (read + write), best of 5."""
    source = torch.empty(2**28, dtype=torch.float32, device=device)  # 1 GiB
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        target.copy_(source)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * 4 / best


def run_pagedllm(path: Path, quantization: str, requests, args) -> dict:
    from pagedllm import LLM, SamplingParams

    llm = LLM(str(path), device=args.device, dtype=args.dtype, quantization=quantization,
              kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False)
    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)  # noqa: E731
    llm.generate([{"prompt_token_ids": list(range(100, 164))}], greedy(8))  # warm-up
    one = llm.generate([{"prompt_token_ids": list(range(100, 116))}], greedy(args.decode_tokens))[0].metrics
    decode_tok_s = (args.decode_tokens - 1) / (one.finish_time - one.first_token_time)
    prefill = min(llm.generate([{"prompt_token_ids": list(range(1000 + i, 1512 + i))}], greedy(1))[0]
                  .metrics.time_to_first_token for i in range(3))
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p, _ in requests], [greedy(n) for _, n in requests])
    elapsed = time.perf_counter() - start
    weight_bytes = llm.engine.model.weight_bytes()
    return {"quantization": quantization, "weight_bytes": weight_bytes, "decode_tok_s": decode_tok_s,
            "decode_weight_bytes_s": weight_bytes * decode_tok_s, "prefill_512_tok_s": 512 / prefill,
            "throughput_output_tok_s": sum(len(o.token_ids) for o in outputs) / elapsed,
            "throughput_tpot_s": percentiles([(o.metrics.finish_time - o.metrics.first_token_time)
                                              / max(1, len(o.token_ids) - 1) for o in outputs])}


def run_transformers(path: Path, requests, args) -> dict:
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()

    def generate(ids: torch.Tensor, n: int, mask: torch.Tensor | None = None) -> float:
        sync(args.device)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync(args.device)
        return time.perf_counter() - start

    prompt = torch.arange(100, 116, device=args.device)[None]
    generate(prompt, 8)  # warm-up
    decode_tok_s = (args.decode_tokens - 1) / (generate(prompt, args.decode_tokens) - generate(prompt, 1))
    long_prompt = torch.arange(1000, 1512, device=args.device)[None]
    prefill = min(generate(long_prompt, 1) for _ in range(3))
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(requests), args.hf_batch_size):
        batch = requests[i:i + args.hf_batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch], device=args.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device=args.device)
        longest = max(n for _, n in batch)
        generate(ids, longest, mask)
        tokens += sum(n for _, n in batch)
    return {"decode_tok_s": decode_tok_s, "prefill_512_tok_s": 512 / prefill,
            "throughput_output_tok_s": tokens / (time.perf_counter() - start), "batch_size": args.hf_batch_size}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=list(SHAPES))
    parser.add_argument("--model", default=None, help="a checkpoint folder instead of random weights")
    parser.add_argument("--quantization", nargs="+", default=["none", "int8", "int4"])
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--kv-cache-memory", type=int, default=8 * 2**30)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--peer", choices=["hf", "none"], default="hf")
    args = parser.parse_args()
    requests = workload(args.num_requests, 0)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else random_checkpoint(args.shape, getattr(torch, args.dtype), Path(tmp))
        bandwidth = copy_bandwidth(args.device)
        report = {"benchmark": "gpu", "device": name, "shape": args.model or args.shape, "dtype": args.dtype,
                  "copy_bandwidth_gb_s": bandwidth / 1e9, "num_requests": len(requests), "pagedllm": []}
        for quantization in args.quantization:
            result = run_pagedllm(path, quantization, requests, args)
            result["decode_fraction_of_bandwidth"] = result["decode_weight_bytes_s"] / bandwidth
            report["pagedllm"].append(result)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()  # the next engine plans its KV pool from free memory
        if args.peer == "hf":
            report["transformers"] = peer = run_transformers(path, requests, args)
            for result in report["pagedllm"]:
                result["ratio"] = {key: result[key] / peer[key] for key in
                                   ("decode_tok_s", "prefill_512_tok_s", "throughput_output_tok_s")}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
