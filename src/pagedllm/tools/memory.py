"""`pagedllm memory`: what a model costs in memory, computed from its files without loading it."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open

from ..config import ModelConfig
from ..models.loaders import ModelSource, read_model_config
from ..models.loaders.gguf_file import open_gguf
from ..attention import KV_Q8_0, Q8_0_VALUES, kv_bytes_per_token
from ..layers.quant import PACKED_TYPES
from ..models.loaders.gguf_loader import is_quantised_matrix
from ..models.loaders.hf_loader import safetensors_files

# Bytes per weight of each --quantization / --dtype choice: plain dtypes, and the blocks that
# int8 (Q8_0: 32 int8 + an fp16 scale) and int4 (Q4_1: 32 nibbles + fp16 scale and min) load into.
WEIGHT_DTYPES = {"float32": 4.0, "bfloat16": 2.0, "int8": 34 / 32, "int4": 20 / 32}
KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "q8_0": KV_Q8_0}


@dataclass(frozen=True)
class MemoryReport:
    model: str
    config: ModelConfig
    num_parameters: int
    file_bytes: int
    packed_bytes: int | None = None  # a GGUF file's matrices as they run packed (auto), the rest in float32

    def weight_bytes(self, dtype: str) -> int:
        return int(self.num_parameters * WEIGHT_DTYPES[dtype])

    def kv_dtypes(self) -> list[str]:
        """The --kv-cache-dtype choices this model takes (q8_0 needs head_dim in whole 32-value blocks)."""
        return [d for d in KV_DTYPES if d != "q8_0" or self.config.head_dim % Q8_0_VALUES == 0]

    def kv_bytes_per_token(self, dtype: str) -> int:
        return kv_bytes_per_token(self.config, KV_DTYPES[dtype])

    def tokens_in(self, budget_bytes: int, dtype: str) -> int:
        return budget_bytes // self.kv_bytes_per_token(dtype)


def _packed_bytes(f) -> int:
    """What `--quantization auto` keeps: kernel formats as stored, other GGML types as Q8_0, floats as float32."""
    total = 0
    for name, t in f.tensors.items():
        if name == "rope_freqs.weight":
            continue
        if is_quantised_matrix(t):
            total += t.nbytes if t.ggml_type in PACKED_TYPES else t.n_elements * 34 // 32
        else:
            total += t.n_elements * 4
    return total


def _count_parameters(source: ModelSource) -> tuple[int, int]:
    if source.kind == "gguf":
        f = open_gguf(source.path)
        return sum(t.n_elements for name, t in f.tensors.items() if name != "rope_freqs.weight"), source.path.stat().st_size
    files = safetensors_files(source.path)
    count = 0
    for path in files:
        with safe_open(os.fspath(path), framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                count += math.prod(shape)
    return count, sum(p.stat().st_size for p in files)


def memory_report(source: ModelSource) -> MemoryReport:
    config, _ = read_model_config(source)
    params, file_bytes = _count_parameters(source)
    packed = _packed_bytes(open_gguf(source.path)) if source.kind == "gguf" else None
    return MemoryReport(source.name, config, params, file_bytes, packed)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def format_report(report: MemoryReport, budget_bytes: int) -> str:
    c = report.config
    lines = [
        f"model            {report.model} ({c.family}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
        f"{c.num_attention_heads} heads / {c.num_key_value_heads} kv heads × {c.head_dim})",
        f"parameters       {report.num_parameters:,}",
        f"file on disk     {format_bytes(report.file_bytes)}",
        "weights          " + (f"as stored (auto) {format_bytes(report.packed_bytes)}, " if report.packed_bytes else "")
        + ", ".join(f"{d} {format_bytes(report.weight_bytes(d))}" for d in WEIGHT_DTYPES),
        "KV cache/token   " + ", ".join(f"{d} {format_bytes(report.kv_bytes_per_token(d))}" for d in report.kv_dtypes())
        + f"   (2 · {c.num_hidden_layers} layers · {c.num_key_value_heads} kv heads · {c.head_dim} dims · bytes)",
        f"tokens in {format_bytes(budget_bytes)}   "
        + ", ".join(f"{d} {report.tokens_in(budget_bytes, d):,}" for d in report.kv_dtypes())
        + f"   (context {c.max_position_embeddings:,})",
    ]
    return "\n".join(lines)
