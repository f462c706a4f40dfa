"""GGUF → ModelConfig + canonical (Hugging Face-named) weights.

The renames from llama.cpp's tensor names and the undoing of its Q/K row permutation live here
and nowhere else.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType

from ...config import ModelConfig, RopeScaling
from ...layers.linear import Weight
from ...layers.quant import PackedWeight
from ..registry import FamilySpec, family_for_gguf
from ...layers.dequant import dequantize
from ...layers.rotary import yarn_mscale
from ...errors import shown
from .gguf_file import GGUFError, GGUFFile
from .gguf_latent import latent_fields, merged_up_projections
from .gguf_mixers import from_gguf, gguf_layer_count, gguf_mixer_fields, loaded_names

LAYER_RENAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    # Mixture of experts: the router, the experts stacked in one 3-D tensor each ({} is the expert),
    # Qwen2-MoE's shared expert and its gate.
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.{}.gate_proj",
    "ffn_up_exps": "mlp.experts.{}.up_proj",
    "ffn_down_exps": "mlp.experts.{}.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
GLOBAL_RENAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "token_embd_norm.weight": "model.embed_layernorm.weight",
    "token_embd_norm.bias": "model.embed_layernorm.bias",
    "output_norm.weight": "model.norm.weight",
    "output_norm.bias": "model.norm.bias",
    "output.weight": "lm_head.weight",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.([\w.]+)$")
_CONSUMED_BY_CONFIG = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}


def layer_renames(family: FamilySpec) -> dict[str, str]:
    """llama.cpp's per-layer tensor names → Hugging Face's, for one family."""
    return {**LAYER_RENAMES, **dict(family.gguf_renames)}


def global_renames(family: FamilySpec) -> dict[str, str]:
    """llama.cpp's names of whole-model tensors → Hugging Face's, for one family."""
    return {**GLOBAL_RENAMES, **dict(family.gguf_global_renames)}


def canonical_name(gguf_name: str, family: FamilySpec) -> str:
    renames = global_renames(family)
    if gguf_name in renames:
        return renames[gguf_name]
    match = _LAYER_NAME.match(gguf_name)
    if not match:
        return gguf_name  # the model reports it as unexpected
    layer, rest = match.groups()
    renames = layer_renames(family)
    if rest in renames:  # a name matched with its suffix (ssm_dt.bias), or one without any (ssm_a)
        return f"model.layers.{layer}.{renames[rest]}"
    part, _, kind = rest.rpartition(".")
    if part in renames and kind in ("weight", "bias"):
        return f"model.layers.{layer}.{renames[part]}.{kind}"
    return gguf_name


def expert_names(canonical: str, experts: int) -> list[str]:
    """The canonical names a stacked expert tensor holds (its first dimension), or the name itself."""
    return [canonical.format(e) for e in range(experts)] if "{}" in canonical else [canonical]


def is_norm_weight(canonical: str) -> bool:
    """The tensors llama.cpp's converter shifts by a family's norm offset (Gemma's 1 + w); Gated DeltaNet's
    own norm is a plain w in a model of (1 + w) norms (Qwen3.5)."""
    return canonical.endswith("norm.weight") and ".linear_attn." not in canonical


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's `permute` of Q/K rows (interleaved rope pairs → rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _int_key(f: GGUFFile, key: str, default: int | None = None) -> int:
    value = f.get(key, default)
    if value is None:
        raise GGUFError(f"{f.path}: required metadata key {key!r} is missing")
    if not isinstance(value, int) or isinstance(value, bool):
        raise GGUFError(f"{f.path}: metadata {key!r} should be one integer, got {type(value).__name__}")
    return value


def _float_key(f: GGUFFile, key: str, default: float) -> float:
    value = f.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise GGUFError(f"{f.path}: metadata {key!r} should be a finite number, got {shown(value)}")
    return float(f"{value:.7g}")  # stored as float32: 1e-5 reads back as 9.99999974e-06


def _factors(f: GGUFFile, name: str) -> tuple[float, ...]:
    info = f.tensors[name]
    return tuple(dequantize(f.tensor_bytes(info), info.ggml_type, info.shape).reshape(-1).tolist())


def _rope_scaling(f: GGUFFile, arch: str) -> RopeScaling | None:
    if "rope_freqs.weight" in f.tensors:
        return RopeScaling(kind="freq_factors", freq_factors=_factors(f, "rope_freqs.weight"))
    if "rope_factors_long.weight" in f.tensors:  # Phi-3's LongRoPE, as llama.cpp's converter writes it
        if "rope_factors_short.weight" not in f.tensors:
            raise GGUFError(f"{f.path}: rope_factors_long without rope_factors_short")
        return RopeScaling(kind="longrope", freq_factors=_factors(f, "rope_factors_short.weight"),
                           long_factors=_factors(f, "rope_factors_long.weight"),
                           original_max_position_embeddings=_int_key(f, f"{arch}.rope.scaling.original_context_length"),
                           attention_factor=_float_key(f, f"{arch}.rope.scaling.attn_factor", 1.0))
    kind = f.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(f.get(f"{arch}.rope.scaling.factor", 1.0)))
    if kind == "yarn":  # llama.cpp's reading: cos/sin × attn_factor × (0.1 ln factor + 1); files pagedllm wrote before
        # carry the factor as yarn_attn_factor (which llama.cpp recomputes, but for deepseek2's yarn_log_mul)
        factor = _float_key(f, f"{arch}.rope.scaling.factor", 1.0)
        extra = _float_key(f, f"{arch}.rope.scaling.attn_factor",
                           _float_key(f, f"{arch}.rope.scaling.yarn_attn_factor", 1.0))
        return RopeScaling(kind="yarn", factor=factor,
                           original_max_position_embeddings=_int_key(f, f"{arch}.rope.scaling.original_context_length"),
                           beta_fast=_float_key(f, f"{arch}.rope.scaling.yarn_beta_fast", 32.0),
                           beta_slow=_float_key(f, f"{arch}.rope.scaling.yarn_beta_slow", 1.0),
                           attention_factor=extra * yarn_mscale(factor))
    raise GGUFError(f"{f.path}: rope scaling {shown(kind)} is not supported (pagedllm supports linear, llama3, longrope "
                    "and yarn)")


def _optional_float(f: GGUFFile, key: str) -> float | None:
    value = _float_key(f, key, 0.0)
    return value or None  # llama.cpp writes 0 for "none"


def _sliding_layers(f: GGUFFile, arch: str, family: FamilySpec, layers: int) -> tuple[bool, ...] | None:
    """Which layers are windowed: the file's pattern (a period, or one flag per layer) or the
    architecture's default, read as llama.cpp does (every period-th layer global, the last of each run)."""
    key = f"{arch}.attention.sliding_window_pattern"
    pattern = f.get(key, family.gguf_swa_pattern)
    if isinstance(pattern, np.ndarray):
        if pattern.shape != (layers,) or pattern.dtype.kind not in "biu":
            raise GGUFError(f"{f.path}: metadata {key!r} should hold one flag per layer ({layers})")
        flags = tuple(bool(p) for p in pattern)
    elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 0:
        flags = tuple(pattern == 0 or i % pattern < pattern - 1 for i in range(layers))
    else:
        raise GGUFError(f"{f.path}: metadata {key!r} should be a period or a list of flags")
    return None if all(flags) else flags


def _query_temperature(f: GGUFFile, arch: str) -> dict:
    """llama.cpp's attention temperature (Ministral 3): beta, over the rope's original context (its floor scale)."""
    beta = _float_key(f, f"{arch}.attention.temperature_scale", 0.0)
    if not beta:
        return {}
    return dict(query_scale_beta=beta, query_scale_span=_int_key(f, f"{arch}.rope.scaling.original_context_length", 0))


def _attention_scale(f: GGUFFile, arch: str, family: FamilySpec, layers: int, hidden: int, heads: int) -> float | None:
    if f"{arch}.attention.scale" in f.metadata:
        return _float_key(f, f"{arch}.attention.scale", 1.0)
    if family.gguf_hidden_scale_layers and layers == family.gguf_hidden_scale_layers:
        return (hidden // heads) ** -0.5
    return None


def _experts(f: GGUFFile, arch: str, family: FamilySpec, layers: int) -> dict:
    experts = _int_key(f, f"{arch}.expert_count", 0)
    if not experts:
        return {}
    if not family.moe:
        raise GGUFError(f"{f.path}: architecture {shown(arch)} with experts is not supported")
    norm = f.get(f"{arch}.expert_weights_norm", family.norm_topk_prob)
    width = _int_key(f, f"{arch}.expert_feed_forward_length", _int_key(f, f"{arch}.feed_forward_length"))
    # Qwen2-MoE's files give the shared expert's width, GLM-4.5's their count (each an expert's width).
    shared = _int_key(f, f"{arch}.expert_shared_feed_forward_length", 0) \
        or _int_key(f, f"{arch}.expert_shared_count", 0) * width
    gating = _int_key(f, f"{arch}.expert_gating_func", 2 if family.moe_scoring == "sigmoid" else 1)
    if gating not in _GATING_FUNCTIONS:
        raise GGUFError(f"{f.path}: expert gating function {gating} is not supported (1 softmax, 2 sigmoid)")
    return dict(num_experts=experts, num_experts_per_tok=_int_key(f, f"{arch}.expert_used_count"),
                moe_intermediate_size=width, shared_expert_intermediate_size=shared, norm_topk_prob=bool(norm),
                dense_layers=tuple(i for i in range(layers)
                                   if f"blk.{i}.ffn_gate_inp.weight" not in f.tensors),
                moe_scoring=_GATING_FUNCTIONS[gating],
                moe_expert_bias=any(name.endswith(".exp_probs_b.bias") for name in f.tensors),
                moe_groups=_int_key(f, f"{arch}.expert_group_count", 1),
                moe_topk_groups=_int_key(f, f"{arch}.expert_group_used_count", 1),
                routed_scaling_factor=_float_key(f, f"{arch}.expert_weights_scale", 1.0),
                shared_expert_gate=any(name.endswith(".ffn_gate_inp_shexp.weight") for name in f.tensors))


_GATING_FUNCTIONS = {1: "softmax", 2: "sigmoid"}  # llama.cpp's expert_gating_func values


def _parts(f: GGUFFile, family: FamilySpec, experts: dict, layers: int, sliding_layers: tuple[bool, ...] | None) -> dict:
    """The family's parts; q/k norms where the file has them (GLM-4.5's are optional); a shared expert's gate
    as the file has it; the NoPE layers by the architecture's rule (FamilySpec.nope_layers)."""
    parts = family.model_parts()
    parts["nope_layers"] = family.nope_layers(layers, sliding_layers, sliding_layers is not None)
    if any(name.endswith(".attn_q_norm.weight") for name in f.tensors):
        parts["qk_norm"] = True
    if "blk.0.attn_output.bias" in f.tensors:  # Seed-OSS, ERNIE 4.5 with biases
        parts["o_proj_bias"] = True
    if "shared_expert_gate" in experts:
        parts["shared_expert_gate"] = experts.pop("shared_expert_gate")
    return parts


def _block_count(f: GGUFFile, arch: str) -> int:
    """block_count, checked against the blocks the file holds tensors of: a count is never trusted to size
    anything (2^32 - 1 blocks built ~9 GB of empty layers before any tensor was read)."""
    layers = _int_key(f, f"{arch}.block_count")
    held = {name.split(".")[1] for name in f.tensors if name.startswith("blk.")}
    if not 0 < layers <= len(held):
        raise GGUFError(f"{f.path}: {arch}.block_count is {layers}, but the file holds tensors of {len(held)} blocks")
    return layers


def gguf_model_config(f: GGUFFile) -> tuple[ModelConfig, FamilySpec]:
    arch = f.require("general.architecture")
    family = family_for_gguf(arch, experts=bool(f.get(f"{arch}.expert_count", 0)))
    hidden = _int_key(f, f"{arch}.embedding_length")
    heads = _int_key(f, f"{arch}.attention.head_count")
    if heads <= 0:
        raise GGUFError(f"{f.path}: {arch}.attention.head_count must be positive, got {heads}")
    if f"{arch}.attention.key_length" not in f.metadata and hidden % heads:
        raise GGUFError(f"{f.path}: {arch}.attention.head_count {heads} does not divide embedding_length {hidden}, "
                        "and no attention.key_length gives the head size")
    # Without an explicit key_length the head size is the embedding split evenly across heads.
    head_dim = _int_key(f, f"{arch}.attention.key_length", hidden // heads if hidden % heads == 0 else None)
    rope_dim = _int_key(f, f"{arch}.rope.dimension_count", head_dim)
    if "token_embd.weight" not in f.tensors:
        raise GGUFError(f"{f.path}: tensor 'token_embd.weight' is missing")
    vocab_size = f.tensors["token_embd.weight"].shape[0]
    window = _int_key(f, f"{arch}.attention.sliding_window", 0) or None
    layers = gguf_layer_count(f, arch, _block_count(f, arch))
    mixers = gguf_mixer_fields(f, arch, family, layers)
    sliding_layers = _sliding_layers(f, arch, family, layers) if window else None
    experts = _experts(f, arch, family, layers)
    parts = _parts(f, family, experts, layers, sliding_layers)
    local_theta = _float_key(f, f"{arch}.rope.freq_base_swa", family.gguf_local_rope_theta or 0.0) or None
    fields = dict(
        family=family.name,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=_int_key(f, f"{arch}.feed_forward_length", 0) or _int_key(f, f"{arch}.expert_feed_forward_length"),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=mixers.pop("num_key_value_heads", None) or _int_key(f, f"{arch}.attention.head_count_kv",
                                                                                heads),
        head_dim=head_dim,
        rotary_dim=rope_dim if rope_dim != head_dim else None,
        rms_norm_eps=_float_key(f, f"{arch}.attention.layer_norm_rms_epsilon",
                                _float_key(f, f"{arch}.attention.layer_norm_epsilon", 1e-6)),
        rope_theta=_float_key(f, f"{arch}.rope.freq_base", 10000.0),
        rope_scaling=_rope_scaling(f, arch),
        max_position_embeddings=_int_key(f, f"{arch}.context_length", 4096),
        tie_word_embeddings="output.weight" not in f.tensors,
        attention_bias="blk.0.attn_q.bias" in f.tensors or "blk.0.attn_qkv.bias" in f.tensors,
        sliding_window=window,
        sliding_layers=sliding_layers,
        local_rope_theta=local_theta if window else None,
        hidden_act=family.hidden_act,
        embedding_scale=_float_key(f, f"{arch}.embedding_scale", float(hidden) ** 0.5 if family.scale_embeddings else 1.0),
        residual_scale=_float_key(f, f"{arch}.residual_scale", 1.0),
        logits_scaling=_float_key(f, f"{arch}.logit_scale", 1.0),
        attention_scale=_attention_scale(f, arch, family, layers, hidden, heads),
        **_query_temperature(f, arch),
        attn_logit_softcap=_optional_float(f, f"{arch}.attn_logit_softcapping"),
        final_logit_softcap=_optional_float(f, f"{arch}.final_logit_softcapping"),
        mlp_bias=family.mlp_bias or "blk.0.ffn_down.bias" in f.tensors,
        **experts,
        **mixers,
        **parts,
        **family.model_shape_parts(layers, vocab_size),
    )
    return ModelConfig(**{**fields, **latent_fields(f, arch)}), family  # latent attention's head sizes, scale


_FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                GGMLQuantizationType.F64}


def is_quantised_matrix(info) -> bool:
    """A matrix (or a stack of experts' matrices) the file stores quantised: it can stay packed."""
    return info.ggml_type not in _FLOAT_TYPES and len(info.shape) in (2, 3)


def packed_tensor_names(f: GGUFFile, family: FamilySpec) -> frozenset[str]:
    """Canonical names of the matrices the file stores quantised."""
    return frozenset(part for info in f.tensors.values() if is_quantised_matrix(info)
                     for name in expert_names(canonical_name(info.name, family), info.shape[0])
                     for part in loaded_names(name))


def gguf_weights(f: GGUFFile, config: ModelConfig, family: FamilySpec, packed: bool = False
                 ) -> Iterator[tuple[str, Weight]]:
    """Yield canonical (name, tensor) pairs one at a time, to bound peak memory.

    Float tensors come as float32. With `packed`, quantised matrices come as PackedWeight views
    of the mapped file (no copy); otherwise they are dequantised to float32.
    """
    weights = _file_weights(f, config, family, packed)
    return merged_up_projections(weights, config) if config.latent_attention else weights


def _file_weights(f: GGUFFile, config: ModelConfig, family: FamilySpec, packed: bool) -> Iterator[tuple[str, Weight]]:
    for info in f.tensors.values():
        if info.name in _CONSUMED_BY_CONFIG or _block_of(info.name) >= config.num_hidden_layers:
            continue  # the multi-token-prediction blocks past the model's layers are not loaded
        name = canonical_name(info.name, family)
        keep_packed = packed and is_quantised_matrix(info)
        tensor = _packed(f, info) if keep_packed else dequantize(f.tensor_bytes(info), info.ggml_type, info.shape)
        if "{}" in name:  # one tensor per expert: views of the stack
            yield from ((expert, _expert(tensor, e)) for e, expert in enumerate(expert_names(name, info.shape[0])))
            continue
        if name.endswith("shared_expert_gate.weight") and tensor.dim() == 1:
            tensor = tensor[None]  # llama.cpp's {n_embd} vector is the [1, hidden] gate
        if family.norm_offset and is_norm_weight(name) and isinstance(tensor, torch.Tensor):
            tensor = tensor - family.norm_offset  # back to the checkpoint's w; the model adds it again
        if family.gguf_qk_permuted and (".q_proj." in name or ".k_proj." in name):
            heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
            tensor = _unpermute(tensor, heads)
            if keep_packed:
                f.release(info)  # the rows were copied: the mapped pages are no longer needed
        yield from from_gguf(name, tensor, config) if config.layer_mixers else ((name, tensor),)


def _block_of(gguf_name: str) -> int:
    match = _LAYER_NAME.match(gguf_name)
    return int(match.group(1)) if match else -1


def _packed(f: GGUFFile, info) -> PackedWeight:
    """The blocks as a view of the map: [rows, bytes] ([experts, rows, bytes] for a stack)."""
    with warnings.catch_warnings():  # the map is read-only, and nothing ever writes to weights
        warnings.simplefilter("ignore", UserWarning)
        data = torch.from_numpy(f.tensor_bytes(info)).view(*info.shape[:-1], -1)
    return PackedWeight(info.ggml_type, data, info.shape[-1])


def _expert(stack: Weight, e: int) -> Weight:
    return PackedWeight(stack.qtype, stack.data[e], stack.cols) if isinstance(stack, PackedWeight) else stack[e]


def _unpermute(tensor: Weight, heads: int) -> Weight:
    if isinstance(tensor, PackedWeight):  # whole rows of blocks move, as float rows would
        return PackedWeight(tensor.qtype, unpermute_rows(tensor.data, heads).contiguous(), tensor.cols)
    return unpermute_rows(tensor, heads)
