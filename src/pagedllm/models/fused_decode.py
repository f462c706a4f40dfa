"""The few-row (decode) path of a decoder layer whose linear layers are packed: two C++ calls
around the attention backend (pagedllm/kernels/decode_layer.cpp) instead of ~20 torch ops, or one
call with the C++ decode kernel inside when the step is one query per sequence.

At batch 1 the model reads each weight once; the small ops between the products (norms, rope,
cache writes, SiLU, residual adds) and the Python that issues them cost more than that read.
The fused path computes what the module path computes — same parts, same order, float32
activations — so a layer takes it only when its parts are the ones the kernels implement
(RMSNorm, optional per-head q/k RMSNorm, packed int8-activation linears, no bias on o/down,
SwiGLU, rotate-half rope — the identity where a model has no rotary positions —, soft-capping and
ALiBi in the attention kernel; no sandwich norms);
any other layer keeps the module path. Steps with LoRA adapters keep the fused path too: the C++
layer adds each adapter's updates to its rows of the four products (lora/layers.py holds them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..attention import AttentionMetadata, LayerAttention
from ..layers.linear import INT8_MAX_ROWS, Linear, PackedMethod
from ..layers.norm import RMSNorm


_NONE = torch.empty(0)  # a projection an adapter does not update
_NO_ROWS = torch.empty(0, dtype=torch.long)  # an adapter that has every row of the step


@dataclass
class FusedDecodeLayer:
    input_norm: RMSNorm
    qkv: Linear
    o: Linear
    post_norm: RMSNorm
    gate_up: Linear
    down: Linear
    q_norm: torch.Tensor | None  # per-head RMSNorm weights of q and k (Qwen3), or None
    k_norm: torch.Tensor | None
    num_heads: int
    num_kv_heads: int
    attention: LayerAttention
    isa: int

    max_rows = INT8_MAX_ROWS  # beyond, the module path's dequantise-and-GEMM products are faster

    @classmethod
    def build(cls, layer: torch.nn.Module) -> "FusedDecodeLayer | None":
        """The fused path for `layer` (a DecoderLayer, weights loaded), or None where it does not apply."""
        attn, mlp = layer.self_attn, layer.mlp
        if not hasattr(mlp, "gate_up_proj"):
            return None  # routed experts (layers/moe.py)
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if not all(isinstance(m.method, PackedMethod) and m.method.int8_activations for m in linears):
            return None
        if layer.pre_feedforward_layernorm is not None or mlp.hidden_act != "silu":
            return None  # parts the C++ layer does not have
        if attn.o_proj.bias is not None or mlp.down_proj.bias is not None:
            return None
        if attn.q_norm is not None:
            norms += (attn.q_norm, attn.k_norm)
        if any(type(n) is not RMSNorm or n.weight.dtype != torch.float32 for n in norms):
            return None
        if attn.qkv_proj.bias is not None and attn.qkv_proj.bias.dtype != torch.float32:
            return None
        qk_norms = (attn.q_norm.weight, attn.k_norm.weight) if attn.q_norm is not None else (None, None)
        return cls(layer.input_layernorm, attn.qkv_proj, attn.o_proj, layer.post_attention_layernorm,
                   mlp.gate_up_proj, mlp.down_proj, *qk_norms, attn.num_heads, attn.num_kv_heads,
                   attn.layer_attention(), attn.qkv_proj.method.isa)

    def applies_to(self, x: torch.Tensor) -> bool:
        return x.dtype == torch.float32 and x.shape[0] <= self.max_rows

    def lora_updates(self, segments: list[tuple[int, torch.Tensor | None]]) -> list[torch.Tensor]:
        """The C++ layer's `lora` argument for a step's adapter segments (lora/layers.py: LoRAContext):
        per adapter, its rows (empty: every row), then Aᵀ and Bᵀ for q/k/v, o, gate/up and down (empty
        where the adapter leaves that product alone). [] without adapters."""
        updates = []
        for adapter_id, rows in segments:
            updates.append(_NO_ROWS if rows is None else rows)
            for linear in (self.qkv, self.o, self.gate_up, self.down):
                update = linear.lora.updates.get(adapter_id) if linear.lora is not None else None
                updates += update if update is not None else (_NONE, _NONE)
        return updates

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata, lora: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """The layer's output for x [tokens, hidden]; x's storage is updated in place and returned.
        `lora`: lora_updates' list ([] without adapters)."""
        ops, rows, a = torch.ops.pagedllm_quant, x.shape[0], self.attention
        x = x.contiguous()
        group = meta.groups[0] if len(meta.groups) == 1 else None
        if group is not None and group.use_decode_kernel:  # one query per sequence: the whole layer in one call
            ops.decode_layer(x, self.input_norm.weight, self.input_norm.eps, self.post_norm.weight, self.post_norm.eps,
                             self.qkv.part_data, self.qkv.part_types, self.qkv.bias, self.q_norm, self.k_norm,
                             self.o.part_data, self.o.part_types, self.gate_up.part_data, self.gate_up.part_types,
                             self.down.part_data, self.down.part_types, cos.reshape(rows, -1), sin.reshape(rows, -1), self.num_heads,
                             self.num_kv_heads, kv_cache, meta.slot_mapping, group.block_tables, group.context_lens,
                             a.scale, a.sliding_window or 0, a.softcap or 0.0, a.alibi, lora, self.isa)
            return x
        q = ops.attention_input(x, self.input_norm.weight, self.input_norm.eps, self.qkv.part_data,
                                self.qkv.part_types, self.qkv.bias, self.q_norm, self.k_norm, cos.reshape(rows, -1),
                                sin.reshape(rows, -1), self.num_heads, self.num_kv_heads, kv_cache, meta.slot_mapping,
                                lora, self.isa)
        out = meta.backend.attend(q, kv_cache, meta, a)
        ops.attention_output_mlp(x, out.contiguous(), self.o.part_data, self.o.part_types, self.post_norm.weight,
                                 self.post_norm.eps, self.gate_up.part_data, self.gate_up.part_types,
                                 self.down.part_data, self.down.part_types, lora, self.isa)
        return x
