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

    def auto_kv_dtype(self) -> str:
        """What `--kv-cache-dtype auto` picks on the CPU (engine/llm_engine.py auto_kv_dtype): float16 for a GGUF
        file's packed weights, float32 for float weights (a Hugging Face folder without --quantization
        int8/int4, which would make them packed too)."""
        return "float32" if self.packed_bytes is None else "float16"

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


def _kv_formula(c: ModelConfig) -> str:
    layers = f"{len(c.attention_layers)} attention layers"
    if c.latent_attention:
        return (f"{layers} · (latent {c.kv_lora_rank} + rotary key {c.head_dim}) · bytes: one row for all "
                f"{c.num_attention_heads} heads")
    return f"2 · {layers} · {c.num_key_value_heads} kv heads · {c.head_dim} dims · bytes"


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
        + f"   ({_kv_formula(c)})",
        f"KV dtype auto    {report.auto_kv_dtype()} (--kv-cache-dtype to choose)",
        *([f"state/sequence   {format_bytes(c.state_bytes_per_sequence)} float32 "
           f"({c.num_hidden_layers - len(c.attention_layers)} recurrent layers; --max-num-seqs of them come out of "
           f"the KV budget first)"] if c.is_hybrid else []),
        f"tokens in {format_bytes(budget_bytes)}   "
        + ", ".join(f"{d} {report.tokens_in(budget_bytes, d):,}" for d in report.kv_dtypes())
        + f"   (context {c.max_position_embeddings:,})",
    ]
    return "\n".join(lines)


# -- fine-tuning ---------------------------------------------------------------------------------
# What training keeps, as a transformers training step keeps it (the tests measure one): the weights;
# a gradient and the optimizer's states per trainable parameter (AdamW: two float32 moments; SGD: one
# momentum); a float32 master copy of trainable weights trained in 16 bits (mixed precision); and the
# activations autograd saves for the backward pass.
TRAIN_MODES = ("full", "lora")
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "sgd": 4}
TRAIN_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class TrainingPlan:
    mode: str = "full"  # full: every parameter trains; lora: low-rank adapters on every linear layer
    seq_len: int = 2048
    batch: int = 1
    optimizer: str = "adamw"
    dtype: str = "bfloat16"  # of weights, gradients and activations (16 bits: with float32 master weights)
    lora_rank: int = 16
    gradient_checkpointing: bool = False  # keep each layer's input only, recompute the rest in backward

    def __post_init__(self) -> None:
        checks = [(self.mode in TRAIN_MODES, f"--train must be one of {', '.join(TRAIN_MODES)}"),
                  (self.optimizer in OPTIMIZER_STATE_BYTES,
                   f"--optimizer must be one of {', '.join(OPTIMIZER_STATE_BYTES)}"),
                  (self.dtype in TRAIN_DTYPES, f"--train-dtype must be one of {', '.join(TRAIN_DTYPES)}"),
                  (self.seq_len > 0 and self.batch > 0 and self.lora_rank > 0,
                   "--seq-len, --batch and --lora-rank must be positive")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class TrainingMemory:
    trainable_parameters: int
    weights: int
    gradients: int
    optimizer_states: int
    master_weights: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_states + self.master_weights + self.activations


def _layer_linears(c: ModelConfig, layer: int) -> list[tuple[int, int]]:
    """(inputs, outputs) of the layer's linear layers that LoRA adapts (routed experts are left alone)."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = [(c.hidden_size, q), (c.hidden_size, kv), (c.hidden_size, kv), (q, c.hidden_size)]
    if not c.is_moe_layer(layer):
        shapes += [(c.hidden_size, c.intermediate_size)] * (2 if c.gated_mlp else 1)
        shapes += [(c.intermediate_size, c.hidden_size)]
    return shapes


def lora_parameters(c: ModelConfig, rank: int) -> int:
    """A (rank × in) and B (out × rank) for each adapted linear layer (peft's target_modules="all-linear")."""
    return sum(rank * (i + o) for layer in range(c.num_hidden_layers) for i, o in _layer_linears(c, layer))


def activation_elements(c: ModelConfig, plan: TrainingPlan) -> tuple[int, int]:
    """Elements saved per token: (one decoder layer, the rest — embeddings, final norm, logits). A layer
    keeps its two norms' inputs and outputs (outputs only where the norm's weight trains), q and k and v
    — repeated to every head, as transformers' attention runs — the attention output twice and its
    log-sum-exp per head (flash/SDPA attention: no seq × seq scores), and the MLP's gate, up,
    activation and product; LoRA adds each adapter's rank-wide middle."""
    h, q = c.hidden_size, c.num_attention_heads * c.head_dim
    inter = (c.num_experts_per_tok * c.moe_intermediate_size + c.shared_expert_intermediate_size
             if c.num_experts else c.intermediate_size)
    lora = plan.mode == "lora"
    norms = 2 * ((h if lora else 2 * h) + 1)
    layer = norms + 5 * q + c.num_attention_heads + 4 * inter
    if lora:
        layer += plan.lora_rank * len(_layer_linears(c, 0))
    rest = c.vocab_size + (0 if lora else 3 * h + 1)
    return layer, rest


def training_memory(config: ModelConfig, num_parameters: int, plan: TrainingPlan) -> TrainingMemory:
    size = TRAIN_DTYPES[plan.dtype]
    trainable = num_parameters if plan.mode == "full" else lora_parameters(config, plan.lora_rank)
    weights = (num_parameters + (trainable if plan.mode == "lora" else 0)) * size
    layer, rest = activation_elements(config, plan)
    tokens = plan.seq_len * plan.batch
    if plan.gradient_checkpointing:  # every layer's input, and one layer recomputed at a time
        per_token = config.num_hidden_layers * config.hidden_size + layer
    else:
        per_token = config.num_hidden_layers * layer
    # The logits go to the loss in float32 whatever the training dtype.
    activations = tokens * (per_token * size + config.vocab_size * 4 + (rest - config.vocab_size) * size)
    return TrainingMemory(trainable, weights, trainable * size, trainable * OPTIMIZER_STATE_BYTES[plan.optimizer],
                          trainable * 4 if size != 4 else 0, activations)


def format_training(report: MemoryReport, plan: TrainingPlan) -> str:
    m = training_memory(report.config, report.num_parameters, plan)
    what = (f"with LoRA (rank {plan.lora_rank}, every linear layer)" if plan.mode == "lora" else "full-parameter")
    rows = [("weights", m.weights, f"{plan.dtype}" + (", frozen base + adapters" if plan.mode == "lora" else "")),
            ("gradients", m.gradients, f"{m.trainable_parameters:,} trainable parameters"),
            ("optimizer", m.optimizer_states, f"{plan.optimizer}: {OPTIMIZER_STATE_BYTES[plan.optimizer]} B/parameter"),
            ("master weights", m.master_weights, "float32 copy (mixed precision)" if m.master_weights else "none"),
            ("activations", m.activations, f"batch {plan.batch} × {plan.seq_len} tokens"
             + (", gradient checkpointing" if plan.gradient_checkpointing else ""))]
    lines = [f"fine-tuning {report.model} {what}" if plan.mode == "lora" else f"{what} fine-tuning of {report.model}"]
    lines += [f"  {name:<15} {format_bytes(value):>12}   {note}" for name, value, note in rows]
    lines.append(f"  {'total':<15} {format_bytes(m.total):>12}   (plus the framework's workspace)")
    return "\n".join(lines)
