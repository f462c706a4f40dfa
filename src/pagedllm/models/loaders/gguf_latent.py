"""DeepSeek's multi-head latent attention in llama.cpp's files (architecture `deepseek2`), both ways.

llama.cpp stores kv_b_proj split per head for its absorbed attention: `attn_k_b` holds each head's key
up-projection transposed ([heads, kv_lora_rank, nope]) and `attn_v_b` its value up-projection ([heads, v,
kv_lora_rank]); the pool's row is declared as one key-value head of kv_lora_rank + rope values (key_length)
whose first kv_lora_rank are the value (value_length), the heads' own sizes in key_length_mla and
value_length_mla, the ranks in attention.kv_lora_rank / q_lora_rank, and YaRN's softmax correction in
rope.scaling.yarn_log_mul (0.1 · mscale_all_dim, as its converter writes it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch

from ...config import ModelConfig
from ...layers.dequant import dequantize
from ...layers.linear import Weight
from ...layers.quant import PackedWeight
from .gguf_file import GGUFError, GGUFFile

_K_B, _V_B, _KV_B = ".self_attn.k_b_proj.weight", ".self_attn.v_b_proj.weight", ".self_attn.kv_b_proj.weight"


def latent_fields(f: GGUFFile, arch: str) -> dict:
    """ModelConfig's latent-attention fields from a deepseek2 file (empty for other files)."""
    if f"{arch}.attention.kv_lora_rank" not in f.metadata:
        return {}
    rank, rope = _count(f, f"{arch}.attention.kv_lora_rank"), _count(f, f"{arch}.rope.dimension_count")
    key, value = _count(f, f"{arch}.attention.key_length_mla"), _count(f, f"{arch}.attention.value_length_mla")
    if not 0 < rope < key:
        raise GGUFError(f"{f.path}: {arch}.attention.key_length_mla ({key}) must exceed the rotary part ({rope})")
    scale = key ** -0.5
    log_mul, factor = f.get(f"{arch}.rope.scaling.yarn_log_mul"), f.get(f"{arch}.rope.scaling.factor", 1.0)
    if log_mul is not None and isinstance(factor, (int, float)) and factor > 1:
        if not (isinstance(log_mul, (int, float)) and math.isfinite(log_mul) and log_mul >= 0):
            raise GGUFError(f"{f.path}: metadata {arch + '.rope.scaling.yarn_log_mul'!r} must be a finite count")
        scale *= (log_mul * math.log(factor) + 1) ** 2
    return dict(kv_lora_rank=rank, q_lora_rank=_count(f, f"{arch}.attention.q_lora_rank", 0), qk_nope_head_dim=key - rope,
                v_head_dim=value, head_dim=rope, rotary_dim=None, attention_scale=scale, rope_interleaved=True)


def _count(f: GGUFFile, key: str, default: int | None = None) -> int:
    value = f.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise GGUFError(f"{f.path}: metadata {key!r} should be a count, got {type(value).__name__}")
    return value


def merged_up_projections(weights: Iterable[tuple[str, Weight]], config: ModelConfig) -> Iterator[tuple[str, Weight]]:
    """The file's per-head halves of each layer's kv_b_proj put back together (its rows head by head: the
    key up-projection's nope rows, then the value's v rows), float: the layer uses it as matrices."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        half = _K_B if name.endswith(_K_B) else _V_B if name.endswith(_V_B) else None
        if half is None:
            yield name, tensor
            continue
        layer = halves.setdefault(name.removesuffix(half), {})
        layer[half] = _float(tensor)
        if len(layer) == 2:
            del halves[name.removesuffix(half)]
            yield name.removesuffix(half) + _KV_B, _joined(layer[_K_B], layer[_V_B], config, name)
    if halves:
        raise GGUFError(f"latent attention: {', '.join(sorted(halves))} lack attn_k_b or attn_v_b")


def _float(tensor: Weight) -> torch.Tensor:
    """A half as float32 (a packed one is a stack of per-head matrices, [heads, rows, bytes])."""
    if not isinstance(tensor, PackedWeight):
        return tensor.float()
    rows = tensor.data.reshape(-1, tensor.data.shape[-1])
    values = dequantize(rows.numpy(), tensor.qtype, (rows.shape[0], tensor.cols))
    return values.reshape(*tensor.data.shape[:-1], tensor.cols)


def _joined(k_b: torch.Tensor, v_b: torch.Tensor, c: ModelConfig, name: str) -> torch.Tensor:
    heads, rank = c.num_attention_heads, c.kv_lora_rank
    if tuple(k_b.shape) != (heads, rank, c.qk_nope_head_dim) or tuple(v_b.shape) != (heads, c.v_head_dim, rank):
        raise GGUFError(f"tensor {name!r}: the key and value up-projections have shapes {tuple(k_b.shape)} and "
                        f"{tuple(v_b.shape)}, the model expects {(heads, rank, c.qk_nope_head_dim)} and "
                        f"{(heads, c.v_head_dim, rank)}")
    return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, rank)


def split_up_projection(name: str, tensor: torch.Tensor, c: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """kv_b_proj as the file's two halves (the writer's side of merged_up_projections); other tensors as they are."""
    if not name.endswith(_KV_B):
        return [(name, tensor)]
    prefix = name.removesuffix(_KV_B)
    per_head = tensor.view(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
    k_b, v_b = per_head.split([c.qk_nope_head_dim, c.v_head_dim], dim=1)
    return [(prefix + _K_B, k_b.transpose(1, 2).contiguous()), (prefix + _V_B, v_b.contiguous())]


def write_latent_metadata(writer, arch: str, c: ModelConfig) -> None:
    """The pool's one key-value head (latent | rotary key, its value the latent), the heads' own sizes, the ranks."""
    if not c.rope_interleaved:  # llama.cpp rotates deepseek2's pairs (2i, 2i + 1), as the released checkpoints
        raise ValueError("latent attention with rotate-half rotary pairs (rope_interleave false) has no deepseek2 form")
    writer.add_head_count_kv(1)
    writer.add_key_length(c.kv_lora_rank + c.head_dim)
    writer.add_value_length(c.kv_lora_rank)
    writer.add_key_length_mla(c.qk_nope_head_dim + c.head_dim)
    writer.add_value_length_mla(c.v_head_dim)
    writer.add_kv_lora_rank(c.kv_lora_rank)
    if c.q_lora_rank:
        writer.add_q_lora_rank(c.q_lora_rank)
    scaling = c.rope_scaling
    if scaling is not None and scaling.kind == "yarn" and scaling.factor > 1:
        mscale = math.sqrt(c.scale / (c.qk_nope_head_dim + c.head_dim) ** -0.5)
        writer.add_rope_scaling_yarn_log_mul((mscale - 1) / math.log(scaling.factor))
