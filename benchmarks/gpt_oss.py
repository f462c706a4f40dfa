"""gpt-oss (issue 37): a gpt-oss-20b-shaped GGUF with random weights, its experts MXFP4 — pagedllm against llama.cpp
on the same file, one stream, same threads, each engine in a fresh process (long_context.py's runs).

    .venv/bin/python benchmarks/gpt_oss.py [--lengths 128,512] [--decode 32] [--rounds 2] [--threads 2]

The file: gpt-oss-20b's shapes (24 layers of hidden 2,880; 64 query heads and 8 key/value heads of 64; sinks;
windows of 128 on the even layers; 32 experts of 2,880, 4 a token, MXFP4 as OpenAI ships them; vocabulary
201,088), written straight to GGUF tensor by tensor (12 GB; 21B float parameters would not fit this machine):
random MXFP4 blocks for the experts, random Q8_0 blocks for attention, the embedding and the head (llama.cpp's
`mxfp4_moe` mix, as `convert --quantize mxfp4_moe` writes), float32 norms, biases, sinks and routers; the
default model's tokenizer padded to the vocabulary. Random weights give random routing: each token's 4 experts
are spread as a trained model's are on average.

For each N: prefill and decode rates of both engines (each keeps its best of `--rounds` alternating runs), the
ratios, and the limits — decode: the bytes a token reads (every non-expert matrix, 4 of 32 experts a layer, the
router, the K/V at N in float16) ÷ read bandwidth; prefill: 2 FLOPs per active parameter a token (the experts
chosen, not all 32) plus causal attention's, ÷ the GEMM rate. With N tokens a step reaches every expert, so
prefill also reads the whole file once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from llamacpp_peer import cpu_model, ensure_llamacpp  # noqa: E402
from long_context import machine_rates, run  # noqa: E402
from vs_llamacpp import CACHE, _padded_tokenizer  # noqa: E402

SHAPE = dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
             num_key_value_heads=8, head_dim=64, num_experts=32, num_experts_per_tok=4, sliding_window=128)


def config():
    from pagedllm.config import ModelConfig, RopeScaling

    s = SHAPE
    return ModelConfig(
        family="gpt_oss", vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"], num_key_value_heads=s["num_key_value_heads"],
        head_dim=s["head_dim"], rms_norm_eps=1e-5, rope_theta=150000.0, max_position_embeddings=131072,
        rope_scaling=RopeScaling(kind="yarn", factor=32.0, original_max_position_embeddings=4096,
                                 attention_factor=1.3465735902799727),
        attention_bias=True, o_proj_bias=True, mlp_bias=True, sliding_window=s["sliding_window"],
        sliding_layers=tuple(i % 2 == 0 for i in range(s["num_hidden_layers"])), hidden_act="swiglu_oai",
        attention_sinks=True, router_bias=True, num_experts=s["num_experts"],
        num_experts_per_tok=s["num_experts_per_tok"], moe_intermediate_size=s["intermediate_size"], norm_topk_prob=True)


def _tensors(c) -> list[tuple[str, tuple[int, ...], str]]:
    """(llama.cpp name, shape rows-first, kind) of every tensor, in file order; kind: f32, q8_0 or mxfp4."""
    h, q, kv, e, w = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, \
        c.num_experts, c.moe_intermediate_size
    out = [("token_embd.weight", (c.vocab_size, h), "q8_0")]
    for i in range(c.num_hidden_layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (h,), "f32"), (b + "attn_q.weight", (q, h), "q8_0"), (b + "attn_q.bias", (q,), "f32"),
                (b + "attn_k.weight", (kv, h), "q8_0"), (b + "attn_k.bias", (kv,), "f32"),
                (b + "attn_v.weight", (kv, h), "q8_0"), (b + "attn_v.bias", (kv,), "f32"),
                (b + "attn_output.weight", (h, q), "q8_0"), (b + "attn_output.bias", (h,), "f32"),
                (b + "attn_sinks.weight", (c.num_attention_heads,), "f32"), (b + "post_attention_norm.weight", (h,), "f32"),
                (b + "ffn_gate_inp.weight", (e, h), "f32"), (b + "ffn_gate_inp.bias", (e,), "f32"),
                (b + "ffn_gate_exps.weight", (e, w, h), "mxfp4"), (b + "ffn_gate_exps.bias", (e, w), "f32"),
                (b + "ffn_up_exps.weight", (e, w, h), "mxfp4"), (b + "ffn_up_exps.bias", (e, w), "f32"),
                (b + "ffn_down_exps.weight", (e, h, w), "mxfp4"), (b + "ffn_down_exps.bias", (e, h), "f32")]
    return out + [("output_norm.weight", (h,), "f32"), ("output.weight", (c.vocab_size, h), "q8_0")]


def _data(name: str, shape: tuple[int, ...], kind: str, rng: np.random.Generator) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q

    from pagedllm.layers.quant import random_blocks

    if kind == "f32":
        base = 1.0 if name.endswith("norm.weight") else 0.0
        return (base + rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    qtype = Q.Q8_0 if kind == "q8_0" else Q.MXFP4
    rows = int(np.prod(shape[:-1]))
    return random_blocks(qtype, rows, shape[-1], rng).reshape(*shape[:-1], -1)


def gguf_file() -> Path:
    """The gpt-oss-20b-shaped file, written once (tensor by tensor: at most one embedding's bytes in memory)."""
    path = CACHE / "gpt-oss-20b-shaped-random.MXFP4_MOE.gguf"
    if path.exists():
        return path
    from gguf import GGMLQuantizationType as Q, GGUFWriter

    from pagedllm.models.loaders import default_model_path
    from pagedllm.layers.quant import row_bytes
    from pagedllm.models.loaders.gguf_file import GGUFFile
    from pagedllm.tools.convert import _write_hparams, _write_value

    c = config()
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    writer = GGUFWriter(str(partial), "gpt-oss")
    _write_hparams(writer, "gpt-oss", c)
    for key, value in _padded_tokenizer(GGUFFile(default_model_path()), c.vocab_size).items():
        _write_value(writer, key, value)
    tensors = _tensors(c)
    rng = np.random.default_rng(0)
    for name, shape, kind in tensors:
        rows = int(np.prod(shape[:-1]))
        if kind == "f32":
            writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * rows * shape[-1])
        else:
            qtype = Q.Q8_0 if kind == "q8_0" else Q.MXFP4
            per_row = row_bytes(qtype, shape[-1])
            writer.add_tensor_info(name, (*shape[:-1], per_row), np.dtype(np.uint8), rows * per_row, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shape, kind in tensors:
        writer.write_tensor_data(_data(name, shape, kind, rng))
    writer.close()
    partial.rename(path)
    return path


def limits(n: int, rates: dict) -> dict:
    """Decode: the bytes one token reads; prefill: the FLOPs of N tokens through their experts and attention."""
    c = config()
    h, q, kv, w = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, \
        c.moe_intermediate_size
    attention_params = (q + 2 * kv) * h + h * q
    expert_params = 3 * h * w
    layers, active = c.num_hidden_layers, c.num_experts_per_tok
    step_bytes = (layers * (attention_params * 34 / 32 + active * expert_params * 17 / 32 + c.num_experts * h * 4)
                  + c.vocab_size * h * 34 / 32  # the head (the embedding reads one row)
                  + n * 2 * layers * kv * 2)  # K/V in float16 (windowed layers read at most 128 of them)
    matrices = layers * (attention_params + active * expert_params) + c.vocab_size * h
    flops = 2 * matrices * n + 2 * layers * c.num_attention_heads * c.head_dim * n * n
    return {"decode_limit_tok_s": round(rates["read_bandwidth_gb_s"] * 1e9 / step_bytes, 2),
            "prefill_limit_tok_s": round(n / (flops / (rates["gemm_gflop_s"] * 1e9)), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="128,512")
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    ensure_llamacpp()
    path, rates = gguf_file(), machine_rates()
    for n in (int(x) for x in args.lengths.split(",")):
        runs: dict[str, list[dict]] = {"pagedllm": [], "llama.cpp": []}
        for _ in range(args.rounds):
            runs["pagedllm"].append(run("pagedllm", path, n, args.decode, args.threads))
            runs["llama.cpp"].append(run("llama.cpp", path, n, args.decode, args.threads, flash=True))
        best = {engine: {k: max(r[k] for r in rs) for k in ("prefill_tok_s", "decode_tok_s")} | {"rss_mib": rs[-1]["rss_mib"]}
                for engine, rs in runs.items()}
        print(json.dumps({"cpu": cpu_model(), "threads": args.threads, "file": path.name,
                          "file_gb": round(path.stat().st_size / 1e9, 2), "n": n, "decode": args.decode,
                          "machine": rates, "pagedllm": best["pagedllm"] | limits(n, rates),
                          "llama.cpp fa=on": best["llama.cpp"],
                          "ratio_pagedllm_over_llamacpp": {k: round(best["pagedllm"][k] / best["llama.cpp"][k], 2)
                                                           for k in ("prefill_tok_s", "decode_tok_s")}}), flush=True)


if __name__ == "__main__":
    main()
