"""Hugging Face folder (config.json + *.safetensors) → ModelConfig + canonical weights."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ...config import ModelConfig, RopeScaling
from ...layers.rotary import yarn_mscale
from ...errors import PagedLLMError, shown
from ..registry import FamilySpec, family_for_hf
from .gguf_mixers import ungrouped_delta_net
from .shard_set import is_shard_set, shard_set_weights
from .stacked_experts import is_stacked_mxfp4, unstacked_experts, unstacked_names


class HFModelError(PagedLLMError, ValueError):
    """A Hugging Face model folder that cannot be read."""


MAX_JSON_BYTES = 32 * 2**20  # config files are kilobytes; the largest tokenizer_config.json seen is a few MB


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a regular file of at most MAX_JSON_BYTES (a symlink to /dev/zero or a FIFO is
    refused, not read forever), nested no deeper than the parser's stack allows."""
    try:
        if not path.is_file():
            raise HFModelError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise HFModelError(f"{path}: larger than {MAX_JSON_BYTES} bytes")
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise HFModelError(f"{path}: not UTF-8 text") from None
    except (OSError, json.JSONDecodeError) as exc:  # their messages name a position, never the contents
        raise HFModelError(f"{path}: cannot read JSON ({exc})") from None
    except RecursionError:
        raise HFModelError(f"{path}: JSON nested too deep") from None
    if not isinstance(data, dict):
        raise HFModelError(f"{path}: expected a JSON object")
    return data


def _rope_scaling(params: dict[str, Any], max_positions: int = 0) -> RopeScaling | None:
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind in ("longrope", "su"):
        return _longrope(params, max_positions)
    if kind == "yarn":
        return _yarn(params, max_positions)
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeScaling(
            kind="llama3", factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]), high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    raise HFModelError(f"rope scaling {shown(kind)} is not supported (pagedllm supports linear, llama3, longrope and yarn)")


def _yarn(params: dict[str, Any], max_positions: int) -> RopeScaling:
    """YaRN, with transformers' defaults and its attention factor (mscale / mscale_all_dim)."""
    original = int(params.get("original_max_position_embeddings") or max_positions)
    factor = float(params.get("factor") or max_positions / original)
    attention = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention is None and mscale and mscale_all_dim:
        attention = (0.1 * mscale * math.log(factor) + 1) / (0.1 * mscale_all_dim * math.log(factor) + 1) \
            if factor > 1 else 1.0
    return RopeScaling(kind="yarn", factor=factor, original_max_position_embeddings=original,
                       attention_factor=float(attention if attention is not None else yarn_mscale(factor)),
                       beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                       truncate=bool(params.get("truncate", True)))


def _longrope(params: dict[str, Any], max_positions: int) -> RopeScaling:
    """Phi-3's LongRoPE; its attention factor as transformers derives it when the config has none."""
    original = int(params["original_max_position_embeddings"])
    factor = params.get("factor") or max_positions / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeScaling(kind="longrope", freq_factors=tuple(map(float, params["short_factor"])),
                       long_factors=tuple(map(float, params["long_factor"])),
                       original_max_position_embeddings=original, attention_factor=float(attention))


def _rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None, float | None, float]:
    """(base, scaling) of the global layers, the windowed layers' own base (if any) and the
    fraction of each head that rotates."""
    # transformers 5 writes `rope_parameters` (per layer type where they differ, as Gemma 3's);
    # older configs use rope_theta + rope_scaling (+ rope_local_base_freq).
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    local_theta = cfg.get("rope_local_base_freq")
    if "full_attention" in params or "sliding_attention" in params:
        local = params.get("sliding_attention") or {}
        if _rope_scaling(local) is not None:
            raise HFModelError("scaled rope on sliding-window layers is not supported")
        local_theta = local.get("rope_theta", local_theta)
        params = params.get("full_attention") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    partial = float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    scaling = _rope_scaling(params, cfg.get("max_position_embeddings", 4096))
    return theta, scaling, None if local_theta is None else float(local_theta), partial


_LAYER_TYPES = {"full_attention": False, "sliding_attention": True}
# Layer types that are no attention (hybrid models), as ModelConfig's mixers.
_MIXER_TYPES = {"conv": "short_conv", "linear_attention": "gated_delta_net"}


def _windows(cfg: dict[str, Any], family: FamilySpec) -> tuple[int | None, tuple[bool, ...] | None]:
    """The sliding window and which layers it applies to (None: all), as transformers decides them."""
    window, layers = cfg.get("sliding_window"), cfg["num_hidden_layers"]
    if family.sliding_window:  # Mistral: one window for every layer
        return window, None
    types = cfg.get("layer_types")
    if types is None and cfg.get("use_sliding_window") and window:  # older Qwen2 configs
        start = cfg.get("max_window_layers", layers)
        types = ["sliding_attention" if i >= start else "full_attention" for i in range(layers)]
    if types is None or not window:
        return None, None
    unknown = sorted(set(map(str, types)) - set(_LAYER_TYPES) - set(_MIXER_TYPES))
    if unknown:
        raise HFModelError(f"layer types {', '.join(unknown)} are not supported (known: {', '.join(_LAYER_TYPES)})")
    sliding = tuple(_LAYER_TYPES.get(t, False) for t in types)
    if not any(sliding):
        return None, None
    return window, None if all(sliding) else sliding


_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu_tanh": "gelu_tanh", "gelu": "gelu"}


def _activation(cfg: dict[str, Any], family: FamilySpec) -> str:
    if cfg.get("swiglu_limit") is not None:
        return "swiglu_oai"  # gpt-oss (its config names "silu", which its experts clamp)
    name = cfg.get("hidden_activation") or cfg.get("hidden_act") or family.hidden_act
    if family.name == "gemma" and name == "gelu":
        name = "gelu_pytorch_tanh"  # transformers' rule: Gemma's legacy "gelu" means the tanh form
    if name not in _ACTIVATIONS:
        raise HFModelError(f"activation {shown(name)} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def _experts(cfg: dict[str, Any], family: FamilySpec) -> dict[str, Any]:
    """The MoE fields of ModelConfig, as transformers reads Mixtral's, Qwen-MoE's and GLM-4.5's configs."""
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") \
        or cfg.get("moe_num_experts") or 0
    if not family.moe or not experts:
        return {}
    layers, step = cfg["num_hidden_layers"], cfg.get("decoder_sparse_step") or cfg.get("moe_layer_interval") or 1
    only_mlp = set(cfg.get("mlp_only_layers") or ())
    # DeepSeek / GLM-4.5 / LFM2-MoE / ERNIE 4.5: the first layers stay dense (ERNIE's past an end index too)
    first_moe = cfg.get("first_k_dense_replace") or cfg.get("num_dense_layers") or cfg.get("moe_layer_start_index") or 0
    last_moe = cfg.get("moe_layer_end_index")
    last_moe = layers - 1 if last_moe is None or last_moe < 0 else last_moe
    width = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    shared = cfg.get("shared_expert_intermediate_size") or \
        (cfg.get("n_shared_experts") or cfg.get("moe_num_shared_experts") or 0) * width
    return dict(num_experts=experts, num_experts_per_tok=cfg.get("num_experts_per_tok") or cfg["moe_k"],
                moe_intermediate_size=width, shared_expert_intermediate_size=shared,
                norm_topk_prob=bool(cfg.get("norm_topk_prob", family.norm_topk_prob)),
                dense_layers=tuple(i for i in range(layers)
                                   if i in only_mlp or (i + 1) % step or i < first_moe or i > last_moe),
                **_routing(cfg, family), routed_scaling_factor=cfg.get("routed_scaling_factor") or 1.0)


# DeepSeek V2's routers (its config's topk_method): softmax scores, no choice bias, groups only where limited.
_V2_ROUTING = {"greedy": False, "group_limited_greedy": True}


def _routing(cfg: dict[str, Any], family: FamilySpec) -> dict[str, Any]:
    """How experts are chosen: the family's way (GLM-4.5, DeepSeek V3), or DeepSeek V2's by its topk_method."""
    if cfg.get("topk_method") in _V2_ROUTING:
        grouped = _V2_ROUTING[cfg["topk_method"]]
        return dict(moe_scoring="softmax", moe_expert_bias=False, moe_groups=(cfg.get("n_group") or 1) if grouped else 1,
                    moe_topk_groups=(cfg.get("topk_group") or 1) if grouped else 1)
    return dict(moe_scoring=cfg.get("scoring_func") or family.moe_scoring,
                moe_expert_bias=bool(cfg.get("use_expert_bias", family.moe_expert_bias)),  # LFM2-MoE's says
                moe_groups=cfg.get("n_group") or 1, moe_topk_groups=cfg.get("topk_group") or 1)


# Older configs' names for the standard keys (BLOOM's, GPT-2's, LFM2's), as transformers' attribute maps.
_ALIASES = {"n_head": "num_attention_heads", "n_layer": "num_hidden_layers", "n_embed": "hidden_size",
            "layer_norm_epsilon": "rms_norm_eps", "norm_eps": "rms_norm_eps", "tie_embedding": "tie_word_embeddings",
            "block_ff_dim": "intermediate_size"}


def _standard_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = {**{new: cfg[old] for old, new in _ALIASES.items() if old in cfg}, **cfg}
    if cfg.get("use_bias") is not None:  # ERNIE 4.5: one flag for every projection's bias
        cfg = {"attention_bias": cfg["use_bias"], "attention_out_bias": cfg["use_bias"], "mlp_bias": cfg["use_bias"],
               **{k: v for k, v in cfg.items() if v is not None}}
    if "intermediate_size" not in cfg and "hidden_size" in cfg:
        cfg["intermediate_size"] = 4 * cfg["hidden_size"]  # BLOOM's fixed ratio
    return cfg


def _mixers(cfg: dict[str, Any]) -> dict[str, Any]:
    """Hybrid models' ModelConfig fields: each layer's mixer and the short convolution's shape (LFM2)."""
    layers, types = cfg["num_hidden_layers"], cfg.get("layer_types")
    if types is None and "full_attn_idxs" in cfg:  # LFM2's older configs
        attention = set(cfg["full_attn_idxs"] or range(layers))
        types = ["full_attention" if i in attention else "conv" for i in range(layers)]
    if types is None or not any(t in _MIXER_TYPES for t in types):
        return {}
    return dict(layer_mixers=tuple(_MIXER_TYPES.get(t, "attention") for t in types),
                conv_kernel=int(cfg.get("conv_L_cache") or cfg.get("linear_conv_kernel_dim") or 0),
                conv_bias=bool(cfg.get("conv_bias", False)),
                **{key: int(cfg.get(key) or 0) for key in ("linear_num_key_heads", "linear_num_value_heads",
                                                          "linear_key_head_dim", "linear_value_head_dim")})


def _intermediate_size(cfg: dict[str, Any]) -> int:
    """The MLP's width; LFM2 derives it (block_auto_adjust_ff_dim): 2/3 of it, × a multiplier, rounded
    up to a multiple, as its module does."""
    size = cfg["intermediate_size"]
    if cfg.get("block_auto_adjust_ff_dim"):
        size = int(2 * size / 3)
        multiplier, multiple = cfg.get("block_ffn_dim_multiplier"), cfg.get("block_multiple_of") or 1
        if multiplier is not None:
            size = int(multiplier * size)
            size = multiple * math.ceil(size / multiple)
    return size


def _latent_attention(cfg: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek's multi-head latent attention: its sizes, head_dim as its rotary part, the softmax scale over the
    whole query head (with YaRN, × mscale(mscale_all_dim)², as the reference), its rotary pairs' order."""
    if not cfg.get("kv_lora_rank"):
        return {}
    nope, rope = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"]
    scale = (nope + rope) ** -0.5
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if params.get("rope_type", params.get("type", "default")) != "default" and params.get("mscale_all_dim"):
        mscale = 0.1 * params["mscale_all_dim"] * math.log(params["factor"]) + 1 if params["factor"] > 1 else 1.0
        scale *= mscale * mscale
    return dict(kv_lora_rank=cfg["kv_lora_rank"], q_lora_rank=cfg.get("q_lora_rank") or 0, qk_nope_head_dim=nope,
                v_head_dim=cfg["v_head_dim"], head_dim=rope, rotary_dim=None, attention_scale=scale,
                rope_interleaved=bool(cfg.get("rope_interleave", True)))


def _query_temperature(cfg: dict[str, Any]) -> dict[str, Any]:
    """Ministral 3's long-context query scale: its rope parameters' llama_4_scaling_beta over their original context."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    beta = params.get("llama_4_scaling_beta")
    if not beta:
        return {}
    return dict(query_scale_beta=float(beta), query_scale_span=int(params["original_max_position_embeddings"]))


def _multipliers(cfg: dict[str, Any]) -> dict[str, Any]:
    """Granite's: the embeddings, each residual branch and the attention scores scaled, the logits divided."""
    names = {"embedding_multiplier": "embedding_scale", "residual_multiplier": "residual_scale",
             "attention_multiplier": "attention_scale", "logits_scaling": "logits_scaling"}
    return {ours: float(cfg[theirs]) for theirs, ours in names.items() if cfg.get(theirs) is not None}


def _parts(cfg: dict[str, Any], family: FamilySpec) -> dict[str, Any]:
    """The family's parts; q/k norms and o_proj's bias where a config says (GLM-4.5's `use_qk_norm`)."""
    parts = family.model_parts()
    if "use_qk_norm" in cfg:
        parts["qk_norm"] = bool(cfg["use_qk_norm"])
    if cfg.get("attention_out_bias") is not None:  # Seed-OSS, ERNIE 4.5: o_proj's bias as the config says
        parts["o_proj_bias"] = bool(cfg["attention_out_bias"])
    if cfg.get("no_rope_layers"):  # SmolLM3: 1 where a layer rotates, 0 where it does not
        parts["nope_layers"] = tuple(i for i, rotates in enumerate(cfg["no_rope_layers"]) if not rotates)
    elif family.nope_unwindowed:  # EXAONE 4: the global layers of a windowed model
        window, sliding = _windows(cfg, family)
        parts["nope_layers"] = family.nope_layers(cfg["num_hidden_layers"], sliding, window is not None)
    return parts


def _shape_parts(cfg: dict[str, Any], family: FamilySpec) -> dict[str, Any]:
    parts = family.model_shape_parts(cfg["num_hidden_layers"], cfg["vocab_size"])
    if family.normalized_head_vocab and "z_loss_weight" in cfg:  # a Baichuan 2 config, whatever its vocabulary
        parts["normalized_head"] = True
    return parts


def hf_model_config(folder: Path) -> tuple[ModelConfig, FamilySpec]:
    cfg = _standard_keys(read_json(folder / "config.json"))
    family = family_for_hf(cfg.get("architectures"))
    try:
        heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
        theta, scaling, local_theta, partial_rotary = _rope(cfg)
        head_dim = cfg.get("head_dim") or hidden // heads
        window, sliding_layers = _windows(cfg, family)
        scalar = cfg.get("query_pre_attn_scalar")
        fields = dict(
            family=family.name,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=_intermediate_size(cfg),
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rotary_dim=int(head_dim * partial_rotary) if partial_rotary != 1.0 else None,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings") or cfg.get("model_max_length", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", family.scale_embeddings)),
            attention_bias=bool(cfg.get("attention_bias", cfg.get("qkv_bias", family.attention_bias))),
            sliding_window=window,
            sliding_layers=sliding_layers,
            local_rope_theta=local_theta if window is not None else None,
            hidden_act=_activation(cfg, family),
            **{key: float(cfg[key]) for key in ("swiglu_alpha", "swiglu_limit") if cfg.get(key) is not None},
            embedding_scale=float(hidden) ** 0.5 if family.scale_embeddings else 1.0,
            attention_scale=float(scalar) ** -0.5 if scalar else None,
            attn_logit_softcap=cfg.get("attn_logit_softcapping"),
            final_logit_softcap=cfg.get("final_logit_softcapping"),
            mlp_bias=bool(cfg.get("mlp_bias") or family.mlp_bias),
            **_experts(cfg, family),
            **_mixers(cfg),
            **_query_temperature(cfg),
            **_parts(cfg, family),
            **_shape_parts(cfg, family),
        )
        # latent attention's head sizes and scale; Granite's multipliers
        config = ModelConfig(**{**fields, **_latent_attention(cfg), **_multipliers(cfg)})
    except KeyError as exc:
        raise HFModelError(f"{folder / 'config.json'}: missing key {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise HFModelError(f"{folder / 'config.json'}: {exc}") from None
    return config, family


def safetensors_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise HFModelError(f"{folder}: no *.safetensors files (pagedllm does not load pickled .bin weights)")
    return files


def canonical_hf_name(name: str, family: FamilySpec) -> str:
    for pattern, canonical in family.hf_renames:
        name = re.sub(pattern, canonical, name)
    return name


def hf_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors under canonical names (fused ones stay whole: loaders.split_fused)."""
    if is_shard_set(folder):  # written by `pagedllm convert --tp/--pp`, canonical names
        yield from shard_set_weights(folder)
        return
    cfg = _standard_keys(read_json(folder / "config.json"))
    family = family_for_hf(cfg.get("architectures"))
    tensors = _checkpoint_tensors(folder, cfg, family)
    yield from unstacked_experts(tensors) if family.hf_stacked_experts else tensors


def hf_packed_tensor_names(folder: Path) -> frozenset[str]:
    """Canonical names of the weights a checkpoint stores quantised (gpt-oss's MXFP4 experts), read from the
    safetensors headers: they stay packed."""
    if is_shard_set(folder):
        return frozenset()
    names = set()
    for path in safetensors_files(folder):
        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                for name in f.keys():
                    if is_stacked_mxfp4(name):
                        names.update(unstacked_names(name, f.get_slice(name).get_shape()[0]))
        except (OSError, RuntimeError, ValueError) as exc:
            raise HFModelError(f"{path}: cannot read safetensors ({exc})") from None
    return frozenset(names)


def _checkpoint_tensors(folder: Path, cfg: dict[str, Any], family: FamilySpec) -> Iterator[tuple[str, torch.Tensor]]:
    config = hf_model_config(folder)[0] if family.hf_grouped_delta_net else None
    for path in safetensors_files(folder):
        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                for name in f.keys():
                    if _multi_token_prediction(name, cfg):
                        continue  # not loaded: pagedllm runs the main model only
                    tensor, name = f.get_tensor(name), canonical_hf_name(name, family)
                    if name.endswith(".mlp.expert_bias"):
                        tensor = tensor.reshape(-1)  # ERNIE 4.5 keeps it [1, experts] (one group)
                    if family.hf_qkv_per_head and ".qkv_proj." in name:
                        tensor = qkv_by_kind(tensor, cfg["num_attention_heads"])
                    if family.hf_grouped_delta_net and (".in_proj_qkvz." in name or ".in_proj_ba." in name):
                        yield from ungrouped_delta_net(name, tensor, config)
                        continue
                    yield name, tensor
        except (OSError, RuntimeError, ValueError) as exc:  # safetensors reports bad headers as these
            raise HFModelError(f"{path}: cannot read safetensors ({exc})") from None


_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


def _multi_token_prediction(name: str, cfg: dict[str, Any]) -> bool:
    """A multi-token-prediction tensor: Qwen3.5's and Qwen3-Next's `mtp.*`, or a layer past the model's
    (GLM-4.5's and DeepSeek V3's `num_nextn_predict_layers` blocks)."""
    if name.startswith("mtp."):
        return True
    match = _LAYER_INDEX.match(name)
    return bool(cfg.get("num_nextn_predict_layers")) and match is not None \
        and int(match.group(1)) >= cfg["num_hidden_layers"]


def qkv_by_kind(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """BLOOM's fused rows, head by head [heads, 3, head_dim], as all q, all k, all v rows."""
    return tensor.reshape(heads, 3, -1, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)
