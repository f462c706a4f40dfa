"""The few-row (decode) path of a decoder layer whose linear layers are packed: two C++ calls
around the attention backend (pagedllm/kernels/decode_layer.cpp) instead of ~20 torch ops, or one
call with the C++ decode kernel inside when the step is one query per sequence — and, where every
layer of the model is fused, one call for all the layers of such a step (FusedDecodeModel).

At batch 1 the model reads each weight once; the small ops between the products (norms, rope,
cache writes, SiLU, residual adds) and the Python that issues them cost more than that read.
The fused path computes what the module path computes — same parts, same order, float32
activations — so a layer takes it only when its parts are the ones the kernels implement
(RMSNorm, optional per-head q/k RMSNorm, packed int8-activation linears, no bias on o/down,
SwiGLU, rotate-half rope — the identity where a model has no rotary positions —, soft-capping and
ALiBi in the attention kernel; no sandwich norms);
any other layer keeps the module path. Hybrid models' gated attention and Gated DeltaNet layers (Qwen3.5)
are fused too, but only whole: for steps of one query per sequence (the recurrent step's C++ form inside). Steps with LoRA adapters keep the fused path too: the C++
layer adds each adapter's updates to its rows of the four products (lora/layers.py holds them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import kernels
from ..attention import AttentionMetadata, LayerAttention
from ..layers.linear import INT8_MAX_ROWS, Linear, PackedMethod
from ..layers.norm import RMSNorm


_NONE = torch.empty(0)  # a projection an adapter does not update
_NO_ROWS = torch.empty(0, dtype=torch.long)  # an adapter that has every row of the step; a model without states
_NO_FLAGS = torch.empty(0, dtype=torch.bool)


def new_decode_layers() -> torch.ScriptObject:
    """An empty C++ holder for a model's fused layers (kernels/decode_layer.cpp: DecodeLayers)."""
    return torch.classes.pagedllm_quant.DecodeLayers()


@dataclass
class FusedDecodeLayer:
    """One layer's handle into the model's C++ DecodeLayers, which holds its weights, checked once."""
    layers: torch.ScriptObject
    index: int
    qkv: Linear  # the linears, for their LoRA updates
    o: Linear
    gate_up: Linear
    down: Linear
    attention: LayerAttention | None  # for the attention backend, where a step is not one query per sequence
    isa: int
    whole_only: bool = False  # gated attention, Gated DeltaNet: steps of one query per sequence only
    delta_net: bool = False  # the mixer is Gated DeltaNet (its cache: the conv state and the matrices)

    max_rows = INT8_MAX_ROWS  # beyond, the module path's dequantise-and-GEMM products are faster

    @staticmethod
    def qualifies(layer: torch.nn.Module) -> bool:
        """Whether `layer` (a DecoderLayer, weights loaded) is made of the parts the C++ layer has."""
        attn, delta_net, mlp = layer.self_attn, layer.linear_attn, layer.mlp
        if (attn is None and delta_net is None) or not hasattr(mlp, "gate_up_proj"):
            return False  # a short convolution (LFM2), routed experts (layers/moe.py)
        if attn is not None and (not hasattr(attn, "qkv_proj") or attn.sinks is not None or attn.query_scale is not None):
            return False  # latent attention (layers/mla.py); attention sinks (gpt-oss: its layers are MoE too); a
            # query temperature (Ministral 3)
        mixer = (attn.qkv_proj, attn.o_proj) if attn is not None else (delta_net.in_proj, delta_net.out_proj)
        linears = (*mixer, mlp.gate_up_proj, mlp.down_proj)
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if not all(isinstance(m.method, PackedMethod) and m.method.int8_activations for m in linears):
            return False
        if layer.pre_feedforward_layernorm is not None or mlp.hidden_act != "silu" or layer.residual_scale != 1.0:
            return False  # parts the C++ layer does not have
        if mixer[1].bias is not None or mlp.down_proj.bias is not None:
            return False
        if delta_net is not None:
            norms += (delta_net.norm,)
        elif attn.q_norm is not None:
            if attn.norm_after_rope:
                return False  # the C++ layer norms before rotating
            norms += (attn.q_norm, attn.k_norm)
        if any(type(n) is not RMSNorm or n.weight.dtype != torch.float32 for n in norms):
            return False
        return mixer[0].bias is None or mixer[0].bias.dtype == torch.float32

    @classmethod
    def build(cls, layer: torch.nn.Module, layers: torch.ScriptObject) -> "FusedDecodeLayer":
        """The fused path for a layer that qualifies, its weights added to `layers`."""
        if layer.linear_attn is not None:
            return cls._build_delta_net(layer, layers)
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        qk_norms = (attn.q_norm.weight, attn.k_norm.weight) if attn.q_norm is not None else (None, None)
        a = attn.layer_attention()
        index = layers.add(
            layer.input_layernorm.weight, layer.input_layernorm.eps, layer.post_attention_layernorm.weight,
            layer.post_attention_layernorm.eps, attn.qkv_proj.part_data, attn.qkv_proj.part_types, attn.qkv_proj.bias,
            *qk_norms, attn.o_proj.part_data, attn.o_proj.part_types, mlp.gate_up_proj.part_data,
            mlp.gate_up_proj.part_types, mlp.down_proj.part_data, mlp.down_proj.part_types, attn.num_heads,
            attn.num_kv_heads, attn.head_dim, a.scale, a.sliding_window or 0, a.softcap or 0.0, a.alibi,
            a.bfloat16_products and kernels.decode_bfloat16_available(), layer.rope_index, attn.output_gate)
        return cls(layers, index, *linears, a, attn.qkv_proj.method.isa, whole_only=attn.output_gate)

    @classmethod
    def _build_delta_net(cls, layer: torch.nn.Module, layers: torch.ScriptObject) -> "FusedDecodeLayer":
        mixer, mlp = layer.linear_attn, layer.mlp
        taps = mixer.conv1d.weight.shape[-1]
        index = layers.add_delta_net(
            layer.input_layernorm.weight, layer.input_layernorm.eps, layer.post_attention_layernorm.weight,
            layer.post_attention_layernorm.eps, mixer.in_proj.part_data, mixer.in_proj.part_types,
            mixer.conv1d.weight.float().reshape(-1, taps).contiguous(), mixer.A_log.float().contiguous(),
            mixer.dt_bias.float().contiguous(), mixer.norm.weight, mixer.norm.eps, mixer.key_heads, mixer.tiled,
            mixer.out_proj.part_data, mixer.out_proj.part_types, mlp.gate_up_proj.part_data, mlp.gate_up_proj.part_types,
            mlp.down_proj.part_data, mlp.down_proj.part_types)
        return cls(layers, index, mixer.in_proj, mixer.out_proj, mlp.gate_up_proj, mlp.down_proj, None,
                   mixer.in_proj.method.isa, whole_only=True, delta_net=True)

    def applies_to(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        return (x.dtype == torch.float32 and x.shape[0] <= self.max_rows
                and (not self.whole_only or _one_query_each(meta)))

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
        rows, layers, i = x.shape[0], self.layers, self.index
        x, cos, sin, lora = x.contiguous(), cos.reshape(rows, -1), sin.reshape(rows, -1), list(lora)
        if self.delta_net:  # kv_cache: this layer's (conv state, matrices)
            layers.decode_delta_net(i, x, *kv_cache, meta.states.slots, meta.states.fresh, lora, self.isa)
            return x
        group = meta.groups[0] if len(meta.groups) == 1 else None
        if group is not None and group.use_decode_kernel:  # one query per sequence: the whole layer in one call
            layers.decode(i, x, cos, sin, kv_cache, meta.slot_mapping, group.block_tables, group.context_lens, lora,
                          self.isa)
            return x
        q = layers.attention_input(i, x, cos, sin, kv_cache, meta.slot_mapping, lora, self.isa)
        out = meta.backend.attend(q, kv_cache, meta, self.attention)
        layers.attention_output_mlp(i, x, out.contiguous(), lora, self.isa)
        return x


@dataclass
class FusedDecodeModel:
    """Every layer of a model fused: a step of one query per sequence runs them all in one C++ call."""
    layers: torch.ScriptObject
    fused: list[FusedDecodeLayer]

    def applies_to(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        return self.fused[0].applies_to(x, meta) and _one_query_each(meta)

    def __call__(self, x: torch.Tensor, ropes: list[tuple[torch.Tensor, torch.Tensor]], kv_caches: list[torch.Tensor],
                 meta: AttentionMetadata, segments: list[tuple[int, torch.Tensor | None]]) -> torch.Tensor:
        """The last layer's output for x [tokens, hidden] (updated in place); `ropes`: (cos, sin) per
        rotation of the model; `segments`: the step's LoRA adapter segments."""
        rows, group = x.shape[0], meta.groups[0]
        lora = [t for layer in self.fused for t in layer.lora_updates(segments)] if segments else []
        x = x.contiguous()
        caches = [t for cache in kv_caches for t in (cache if isinstance(cache, tuple) else (cache,))]
        states = meta.states
        self.layers.decode_all(x, [cos.reshape(rows, -1) for cos, _ in ropes], [sin.reshape(rows, -1) for _, sin in ropes],
                               caches, meta.slot_mapping, group.block_tables, group.context_lens,
                               _NO_ROWS if states is None else states.slots, _NO_FLAGS if states is None else states.fresh,
                               lora, self.fused[0].isa)
        return x


def _one_query_each(meta: AttentionMetadata) -> bool:
    """A step of one new token per sequence, in one group that the C++ decode kernel attends."""
    return len(meta.groups) == 1 and meta.groups[0].use_decode_kernel
