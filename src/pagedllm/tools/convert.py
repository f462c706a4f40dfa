"""Export canonical weights to GGUF in llama.cpp's layout (tensor names, Q/K row order, keys).

The inverse of models/loaders/gguf_loader.py: what llama.cpp's convert_hf_to_gguf.py writes
for llama-family models, through the `gguf` package's writer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from gguf import ExpertGatingFuncType, GGMLQuantizationType, GGUFWriter
from gguf import quants as gguf_quants

from ..config import ModelConfig
from ..layers.linear import Weight
from ..layers.quant import QUANTIZERS, PackedWeight, quantize
from ..layers.rotary import rope_inv_freq, yarn_mscale
from ..models.loaders import split_fused
from ..models.loaders.gguf_loader import GLOBAL_RENAMES, is_norm_weight, layer_renames
from ..models.loaders.gguf_latent import split_up_projection, write_latent_metadata
from ..models.loaders.gguf_mixers import grouped_ba, head_count_kv, to_gguf, write_mixer_metadata
from ..models.registry import FamilySpec, family_by_name

Q = GGMLQuantizationType
_TYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q5_0": Q.Q5_0, "q5_1": Q.Q5_1,
          "q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K, "mxfp4": Q.MXFP4}
# llama.cpp's mixes, simplified: attn_v, ffn_down and the output head one step more precise; mxfp4_moe (as
# gpt-oss ships) the routed experts' matrices in MXFP4, every other matrix in q8_0.
_MIXES = {"q4_k_m": ("q4_k", "q6_k"), "q5_k_m": ("q5_k", "q6_k"), "mxfp4_moe": ("q8_0", "q8_0")}
_PRECISE_PARTS = ("attn_v.", "ffn_down.", "output.")
# A K-quant needs rows of 256 values; narrower rows fall back as llama.cpp does.
# Routers and convolutions (a few taps a channel) stay float, as llama.cpp keeps them.
_FLOAT_PARTS = ("ffn_gate_inp", "ssm_conv1d", "shortconv.conv")
_K_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
WEIGHT_TYPES = tuple(_TYPES) + tuple(_MIXES)


def tensor_type(weight_type: str, gguf_tensor: str, shape: tuple[int, ...]) -> str:
    """The type one tensor is written in, for a file type (a plain type or a mix such as q4_k_m).
    `shape`: one matrix's (one expert's, for a stack of experts)."""
    if len(shape) != 2 or any(part in gguf_tensor for part in _FLOAT_PARTS) or shape[1] % 32:
        return "f32"
    if weight_type == "mxfp4_moe" and "_exps." in gguf_tensor:
        return "mxfp4"
    if weight_type in _MIXES:
        base, precise = _MIXES[weight_type]
        weight_type = precise if any(p in gguf_tensor for p in _PRECISE_PARTS) else base
        if gguf_tensor == "token_embd.weight":
            weight_type = "q8_0"
    if weight_type in _K_FALLBACK and shape[1] % 256:
        return _K_FALLBACK[weight_type]
    return weight_type


_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def expert_of(canonical: str) -> int | None:
    match = _EXPERT.search(canonical)
    return int(match.group(1)) if match else None


def gguf_name(canonical: str, family: FamilySpec) -> str:
    """llama.cpp's name for a canonical tensor (an expert's: that of the stack it goes into)."""
    whole = {hf: gguf for gguf, hf in (*GLOBAL_RENAMES.items(), *family.gguf_global_renames)}  # the family's last
    if canonical in whole:
        return whole[canonical]
    to_gguf = {hf: gguf for gguf, hf in layer_renames(family).items()}
    layer, _, rest = _EXPERT.sub(".experts.{}.", canonical).removeprefix("model.layers.").partition(".")
    if rest in to_gguf:  # named with its suffix (ssm_dt.bias), or without one (ssm_a)
        return f"blk.{layer}.{to_gguf[rest]}"
    part, _, leaf = rest.rpartition(".")
    if part not in to_gguf:
        raise ValueError(f"tensor {canonical!r} has no llama.cpp name in family {family.name}")
    return f"blk.{layer}.{to_gguf[part]}.{leaf}"


def _llama_cpp_tensors(weights: Iterable[tuple[str, torch.Tensor]], config: ModelConfig,
                       family: FamilySpec) -> Iterable[tuple[str, torch.Tensor]]:
    """Fused checkpoint tensors that llama.cpp stores split (Baichuan's W_pack) as their parts."""
    for name, tensor in weights:
        try:
            gguf_name(name, family)
        except ValueError:
            yield from split_fused([(name, tensor)], config)
            continue
        yield name, tensor


def permute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's `permute`: rotate-half halves → interleaved rope pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_architecture(config: ModelConfig) -> str:
    family = family_by_name(config.family)
    return family.gguf_architectures[0] if family.gguf_architectures else "llama"


def write_gguf(path: str | os.PathLike, config: ModelConfig, weights: Iterable[tuple[str, torch.Tensor]],
               metadata: dict[str, Any] | None = None, weight_type: str = "f32") -> None:
    """Write a model; `metadata` adds keys such as `tokenizer.*` copied from another GGUF.

    `weight_type`: one of WEIGHT_TYPES, for every matrix (norms and biases stay f32). Packed weights (gpt-oss's
    MXFP4 experts from its Hugging Face checkpoint) are written as they are, whatever `weight_type`; a YaRN
    without truncated ramp ends (gpt-oss) is written as llama.cpp's converter writes it, and llama.cpp (and
    pagedllm, reading the file) then runs its ramp truncated.
    """
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight type must be one of {', '.join(WEIGHT_TYPES)}, got {weight_type!r}")
    arch = gguf_architecture(config)
    family = family_by_name(config.family)
    _check_nope_layers(config, family)
    writer = GGUFWriter(os.fspath(path), arch)
    _write_hparams(writer, arch, config)
    for key, value in (metadata or {}).items():
        _write_value(writer, key, value)
    stacks: dict[str, dict[int, torch.Tensor]] = {}  # experts' matrices, until each stack is complete
    weights = _llama_cpp_tensors(weights, config, family)
    if family.hf_grouped_delta_net:  # Qwen3-Next's files keep [b a] grouped per key head, as its checkpoints
        weights = grouped_ba(weights, config)
    if config.latent_attention:  # llama.cpp's attn_k_b and attn_v_b
        weights = (pair for name, tensor in weights for pair in split_up_projection(name, tensor, config))
    for name, tensor in weights:
        if isinstance(tensor, PackedWeight):
            _stack_or_add(writer, stacks, config, gguf_name(name, family), expert_of(name), tensor, weight_type)
            continue
        tensor = tensor.detach().float()
        if config.layer_mixers:
            tensor = to_gguf(name, tensor, config, family)
        if family.gguf_qk_permuted and (".q_proj." in name or ".k_proj." in name):
            heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
            tensor = permute_rows(tensor, heads)
        if family.norm_offset and is_norm_weight(name):
            tensor = tensor + family.norm_offset  # llama.cpp stores Gemma's norms as 1 + w
        if config.normalized_head and name == "lm_head.weight":
            tensor = torch.nn.functional.normalize(tensor)  # Baichuan 2's NormHead, as its model does at first use
        _stack_or_add(writer, stacks, config, gguf_name(name, family), expert_of(name), tensor, weight_type)
    if stacks:
        raise ValueError(f"incomplete expert tensors for {', '.join(sorted(stacks))}")
    scaling = config.rope_scaling
    if scaling is not None and scaling.kind == "llama3":
        plain = rope_inv_freq(config.rope_dims, config.rope_theta, None)
        scaled = rope_inv_freq(config.rope_dims, config.rope_theta, scaling)
        _add_tensor(writer, "rope_freqs.weight", plain / scaled, "f32")
    if scaling is not None and scaling.kind == "longrope":
        _add_tensor(writer, "rope_factors_long.weight", torch.tensor(scaling.long_factors), "f32")
        _add_tensor(writer, "rope_factors_short.weight", torch.tensor(scaling.freq_factors), "f32")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _check_nope_layers(c: ModelConfig, family: FamilySpec) -> None:
    """llama.cpp knows NoPE layers only by its architecture's rule (SmolLM3: every 4th; EXAONE 4: the global ones)."""
    expected = family.nope_layers(c.num_hidden_layers, c.sliding_layers, c.sliding_window is not None)
    if c.nope_layers != expected:
        raise ValueError(f"layers without rotary positions {list(c.nope_layers)} have no GGUF form in family "
                         f"{c.family} (llama.cpp's: {list(expected) or 'none'})")


def _write_hparams(writer: GGUFWriter, arch: str, c: ModelConfig) -> None:
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    if c.latent_attention:
        write_latent_metadata(writer, arch, c)
    else:
        writer.add_head_count_kv(head_count_kv(c))
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.rope_dims)
    if c.norm_kind == "layer":
        writer.add_layer_norm_eps(c.rms_norm_eps)
    else:
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_vocab_size(c.vocab_size)
    if c.sliding_window:
        writer.add_sliding_window(c.sliding_window)
        # One flag per layer: llama.cpp reads a list as it stands, where a period would need its default.
        writer.add_sliding_window_pattern([c.layer_window(i) is not None for i in range(c.num_hidden_layers)])
    if c.local_rope_theta is not None:
        writer.add_rope_freq_base_swa(c.local_rope_theta)
    if c.attention_scale is not None:
        writer.add_float32(f"{arch}.attention.scale", c.attention_scale)
    if c.query_scale_beta:  # llama.cpp's attention temperature; its floor scale is the rope's original context
        writer.add_float32(f"{arch}.attention.temperature_scale", c.query_scale_beta)
        if c.rope_scaling is None or c.rope_scaling.kind not in ("yarn", "longrope"):
            writer.add_rope_scaling_orig_ctx_len(c.query_scale_span)
        elif c.rope_scaling.original_max_position_embeddings != c.query_scale_span:
            raise ValueError("a query temperature over another span than the rope's original context has no GGUF form")
    if c.residual_scale != 1.0 or c.logits_scaling != 1.0:  # Granite's multipliers, as llama.cpp's keys
        writer.add_embedding_scale(c.embedding_scale)
        writer.add_residual_scale(c.residual_scale)
        writer.add_logit_scale(c.logits_scaling)
    if c.attn_logit_softcap is not None:
        writer.add_attn_logit_softcapping(c.attn_logit_softcap)
    if c.final_logit_softcap is not None:
        writer.add_final_logit_softcapping(c.final_logit_softcap)
    if c.rope_scaling is not None and c.rope_scaling.kind == "longrope":
        writer.add_rope_scaling_orig_ctx_len(c.rope_scaling.original_max_position_embeddings)
        writer.add_rope_scaling_attn_factors(c.rope_scaling.attention_factor)
    if c.num_experts:
        writer.add_expert_count(c.num_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
        writer.add_expert_weights_norm(c.norm_topk_prob)
        if c.shared_expert_intermediate_size:
            writer.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
            if not c.shared_expert_gate and c.shared_expert_intermediate_size % c.moe_intermediate_size == 0:
                # llama.cpp's GLM-4.5 (plain shared experts) reads their count
                writer.add_expert_shared_count(c.shared_expert_intermediate_size // c.moe_intermediate_size)
        writer.add_expert_gating_func(ExpertGatingFuncType.SIGMOID if c.moe_scoring == "sigmoid"
                                      else ExpertGatingFuncType.SOFTMAX)
        if c.routed_scaling_factor != 1.0:
            writer.add_expert_weights_scale(c.routed_scaling_factor)
        if c.moe_groups > 1:
            writer.add_expert_group_count(c.moe_groups)
            writer.add_expert_group_used_count(c.moe_topk_groups)
        if c.dense_layers and c.dense_layers == tuple(range(len(c.dense_layers))):
            writer.add_leading_dense_block_count(len(c.dense_layers))
            writer.add_interleave_moe_layer_step(1)  # ERNIE 4.5 MoE's files must say it (llama.cpp asserts)
    if c.rope_scaling is not None and c.rope_scaling.kind == "yarn":
        s = c.rope_scaling
        writer.add_string(f"{arch}.rope.scaling.type", "yarn")
        writer.add_float32(f"{arch}.rope.scaling.factor", s.factor)
        writer.add_rope_scaling_orig_ctx_len(s.original_max_position_embeddings)
        writer.add_rope_scaling_yarn_beta_fast(s.beta_fast)
        writer.add_rope_scaling_yarn_beta_slow(s.beta_slow)
        # llama.cpp scales cos/sin by rope.scaling.attn_factor × mscale(factor) (it recomputes yarn_attn_factor
        # itself); deepseek2 files carry their correction in yarn_log_mul instead (gguf_latent.py).
        if c.latent_attention:
            writer.add_rope_scaling_yarn_attn_factor(s.attention_factor / yarn_mscale(s.factor))
        else:
            writer.add_rope_scaling_attn_factors(s.attention_factor / yarn_mscale(s.factor))
    if c.rope_scaling is not None and c.rope_scaling.kind == "linear":
        writer.add_string(f"{arch}.rope.scaling.type", "linear")
        writer.add_float32(f"{arch}.rope.scaling.factor", c.rope_scaling.factor)
    if c.layer_mixers:
        write_mixer_metadata(writer, arch, c)


def _stack_or_add(writer: GGUFWriter, stacks: dict[str, dict[int, Weight]], config: ModelConfig, target: str,
                  expert: int | None, tensor: Weight, weight_type: str) -> None:
    """Write one tensor, or keep an expert's until its layer's stack is complete (then write the stack)."""
    kind = tensor_type(weight_type, target, tuple(tensor.shape))  # one matrix's shape decides, not the stack's
    if expert is not None:
        stack = stacks.setdefault(target, {})
        stack[expert] = tensor
        if len(stack) < config.num_experts:
            return
        del stacks[target]
        members = [stack[e] for e in range(config.num_experts)]
        tensor = PackedWeight(members[0].qtype, torch.stack([m.data for m in members]), members[0].cols) \
            if isinstance(members[0], PackedWeight) else torch.stack(members)
    if isinstance(tensor, PackedWeight):
        data = tensor.data.numpy()
        writer.add_tensor(target, data, raw_shape=data.shape, raw_dtype=tensor.qtype)
    else:
        _add_tensor(writer, target, tensor, kind)


def _add_tensor(writer: GGUFWriter, name: str, tensor: torch.Tensor, weight_type: str) -> None:
    qtype = _TYPES[weight_type]
    data = tensor.numpy().astype(np.float32)
    if qtype == GGMLQuantizationType.F32:
        writer.add_tensor(name, data)
    elif qtype == GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:  # the gguf package quantises the legacy types only; ours are the same blocks, and vectorised
        matrices = tensor.reshape(-1, tensor.shape[-1])  # a stack of experts: all their rows at once
        blocks = quantize(matrices, qtype).data.numpy() if qtype in QUANTIZERS else gguf_quants.quantize(
            data.reshape(matrices.shape), qtype)
        blocks = blocks.reshape(*tensor.shape[:-1], -1)
        writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)


def _write_value(writer: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    else:
        raise TypeError(f"cannot write metadata {key!r} of type {type(value).__name__}")
