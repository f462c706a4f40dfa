"""`pagedllm convert`: another family's checkpoint, a GGUF file, tensor/pipeline shards, a merged LoRA."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parsers(sub) -> None:
    conv = sub.add_parser("convert", help="write a model as another family's checkpoint, a GGUF file, or shards")
    conv.add_argument("source", metavar="SRC", help="a .gguf file, a Hugging Face folder or a shard set")
    conv.add_argument("--to", default=None, metavar="FAMILY",
                      help="the family to write (llama, mistral, qwen2, qwen3; default: the source's)")
    conv.add_argument("--out", required=True, metavar="DIR|FILE.gguf",
                      help="a folder (Hugging Face checkpoint) or a .gguf file")
    conv.add_argument("--quantize", default=None, metavar="TYPE",
                      help="the GGUF weight type: f32 (default), f16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, "
                           "q4_k_m, q5_k_m")
    conv.add_argument("--tp", type=int, default=1, help="split into this many tensor-parallel shards")
    conv.add_argument("--pp", type=int, default=1, help="split into this many pipeline stages")
    conv.add_argument("--merge", action="store_true", help="merge a shard set back into one checkpoint")
    conv.add_argument("--merge-lora", default=None, metavar="ADAPTER",
                      help="bake a LoRA adapter (PEFT folder or llama.cpp GGUF LoRA) into the weights, in float32 "
                           "(then quantised by --quantize where given)")


def cmd_convert(args: argparse.Namespace) -> int:
    from ...models.loaders import resolve_model
    from ...tools.export import ConvertPlan, convert

    plan = ConvertPlan(args.to, args.quantize, args.tp, args.pp, args.merge, args.merge_lora)
    print(convert(resolve_model(args.source), Path(args.out), plan))
    return 0


COMMANDS = {"convert": cmd_convert}
