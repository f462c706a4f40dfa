"""`pagedllm convert`: a loaded model written as a checkpoint of another family, when that family's
architecture can express it (qwen2 → LlamaForCausalLM with attention_bias, baichuan → llama by
unfusing W_pack and folding its normalised head, llama → qwen2 with zero q/k/v biases…), as a
GGUF file in any packed format, or split into tensor- and pipeline-parallel shards.

A family is a set of parts (models/registry.py), so whether a conversion is exact is a question
about parts: every part of the source must be one the target's architecture has, or one that folds
away exactly (a normalised head, an all-zero bias). Anything else is
refused with the reasons, all of them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ModelConfig, RopeScaling
from ..errors import PagedLLMError
from ..layers.dequant import dequantize
from ..layers.quant import PackedWeight
from ..lora.adapter import LoRAAdapter, load_adapter
from ..models.loaders import ModelSource, read_model_config, split_fused
from ..models.loaders.gguf_file import open_gguf
from ..models.loaders.gguf_loader import gguf_weights
from ..models.loaders.hf_loader import hf_weights
from ..models.loaders.shard_set import write_shard_set
from ..tokenizer import Tokenizer, load_tokenizer
from ..tokenizer.gguf_vocab import PRE_TOKENIZER_REGEXES, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_USER_DEFINED
from .convert import WEIGHT_TYPES, write_gguf

Weights = dict[str, torch.Tensor]


class ConversionError(PagedLLMError, ValueError):
    """A conversion that cannot be done exactly; the message says why."""


@dataclass(frozen=True)
class Target:
    """What one family's Hugging Face architecture can express."""

    family: str
    architecture: str
    model_type: str
    qkv_bias: str  # "never", "always" (zeros where the source has none) or "optional" (config attention_bias)
    o_bias: bool  # the o projection is biased whenever q/k/v are (llama's attention_bias)
    windows: str  # "none", "all" (one window for every layer) or "per_layer" (layer_types)
    qk_norm: bool = False


HF_TARGETS = {t.family: t for t in (
    Target("llama", "LlamaForCausalLM", "llama", "optional", True, "none"),
    Target("mistral", "MistralForCausalLM", "mistral", "never", False, "all"),
    Target("qwen2", "Qwen2ForCausalLM", "qwen2", "always", False, "per_layer"),
    Target("qwen3", "Qwen3ForCausalLM", "qwen3", "optional", True, "per_layer", qk_norm=True),
)}
# A GGUF file of these families (llama.cpp's architectures) keeps any window, per layer.
GGUF_WINDOWS = "per_layer"


def canonical_weights(source: ModelSource, split: bool = True, keep_packed: bool = False) -> tuple[ModelConfig, Weights]:
    """The model's float32 tensors under canonical names, in the checkpoint's row order (fused ones split
    unless `split` is False); a Hugging Face checkpoint's packed tensors (gpt-oss's MXFP4 experts) as they are
    with `keep_packed`, else dequantised."""
    config, family = read_model_config(source)
    if source.kind == "gguf":
        weights = gguf_weights(open_gguf(source.path), config, family, packed=False)
    else:
        weights = hf_weights(source.path)
    if family.fused_checkpoint and split:
        weights = split_fused(weights, config)
    return config, {name: tensor if keep_packed and isinstance(tensor, PackedWeight) else _float(tensor)
                    for name, tensor in weights}


def _float(tensor: torch.Tensor | PackedWeight) -> torch.Tensor:
    if isinstance(tensor, PackedWeight):
        return dequantize(tensor.data.numpy(), tensor.qtype, tensor.shape)
    return tensor.float().contiguous()


def _window_matters(config: ModelConfig) -> bool:
    return config.sliding_window is not None and config.sliding_window < config.max_position_embeddings


def refusals(config: ModelConfig, target: Target, windows: str) -> list[str]:
    """Why `config` cannot be written as `target` (empty: it can). `windows`: what the output format keeps."""
    arch = target.architecture
    checks = [
        (config.num_experts > 0, "routed experts (a mixture of experts)"),
        (config.latent_attention, "multi-head latent attention (MLA)"),
        (config.is_hybrid, "recurrent layers (a hybrid model)"),
        (config.attention_output_gate, "gated attention outputs"),
        (bool(config.nope_layers), "layers without rotary positions (NoPE)"),
        (config.residual_scale != 1.0 or config.logits_scaling != 1.0, "residual and logit multipliers (Granite)"),
        (config.o_proj_bias, "an output projection bias"),
        (config.position_encoding == "alibi", f"ALiBi position biases ({arch} has rotary positions only)"),
        (config.position_encoding == "none", "no position encoding"),
        (config.norm_kind != "rms", "LayerNorm"),
        (config.embedding_norm, "a norm after the embeddings"),
        (not config.gated_mlp, "a plain (ungated) MLP"),
        (config.mlp_bias, "MLP biases"),
        (config.sandwich_norms, "norms around each sub-layer"),
        (config.qk_norm and not target.qk_norm, "per-head q/k norms"),
        (target.qk_norm and not config.qk_norm, f"no per-head q/k norms ({arch} always has them)"),
        (config.norm_offset != 0, "(1 + w) norms"),
        (config.embedding_scale != 1.0, "scaled embeddings (Gemma's √hidden, Granite's multiplier)"),
        (config.attn_logit_softcap is not None or config.final_logit_softcap is not None, "soft-capped logits"),
        (config.attention_scale is not None and not math.isclose(config.scale, config.head_dim ** -0.5),
         "a query scale other than 1/√head_dim"),
        (config.rope_dims < config.head_dim, "rotary on part of each head"),
        (config.rope_interleaved, "interleaved rotary pairs"),
        (config.local_rope_theta is not None, "a second rope base for windowed layers"),
        (_window_matters(config) and windows == "none",
         f"a sliding window of {config.sliding_window} tokens ({arch} attends to the whole context; "
         f"--to qwen2, or a GGUF file, keeps it)"),
        (_window_matters(config) and windows == "all" and config.sliding_layers is not None,
         f"a window on some layers only ({arch} windows every layer)"),
    ]
    return [reason for failed, reason in checks if failed]


def retarget(config: ModelConfig, weights: Weights, target: Target, windows: str) -> tuple[ModelConfig, Weights]:
    """`config` and `weights` as the target family's: parts folded, biases added or dropped; or refused."""
    reasons = refusals(config, target, windows)
    weights = dict(weights)
    if config.normalized_head:  # Baichuan 2's NormHead, folded: the rows at unit length
        weights["lm_head.weight"] = torch.nn.functional.normalize(weights["lm_head.weight"])
    bias, bias_reasons = _biases(config, weights, target)
    if reasons or bias_reasons:
        raise ConversionError(f"a {config.family} model cannot be written as {target.architecture}: it has "
                              + "; ".join(reasons + bias_reasons))
    window = config.sliding_window if _window_matters(config) else None
    new = dataclasses.replace(
        config, family=target.family, attention_bias=bias, o_proj_bias=bias and target.o_bias, normalized_head=False,
        sliding_window=window, sliding_layers=config.sliding_layers if window else None)
    return new, weights


_QKV = ("q_proj", "k_proj", "v_proj")


def _biases(config: ModelConfig, weights: Weights, target: Target) -> tuple[bool, list[str]]:
    """Whether the target's attention is biased; adds zero biases it needs, drops all-zero ones it has no
    place for, and says which non-zero ones cannot go."""
    layers = range(config.num_hidden_layers)

    def name(layer: int, proj: str) -> str:
        return f"model.layers.{layer}.self_attn.{proj}.bias"

    def nonzero(projs: tuple[str, ...]) -> bool:
        return any(name(i, p) in weights and bool(weights[name(i, p)].any()) for i in layers for p in projs)

    qkv_used, o_used = nonzero(_QKV), nonzero(("o_proj",))
    biased = {"never": False, "always": True, "optional": qkv_used or (o_used and target.o_bias)}[target.qkv_bias]
    reasons = []
    if qkv_used and not biased:
        reasons.append(f"q/k/v biases ({target.architecture} has none)")
    if o_used and not (biased and target.o_bias):
        reasons.append(f"an output projection bias ({target.architecture} has none)")
    rows = {"q_proj": config.num_attention_heads * config.head_dim, "k_proj": config.num_key_value_heads * config.head_dim,
            "v_proj": config.num_key_value_heads * config.head_dim, "o_proj": config.hidden_size}
    wanted = _QKV + (("o_proj",) if target.o_bias else ()) if biased else ()
    for i in layers:
        for proj, size in rows.items():
            if proj in wanted:
                weights.setdefault(name(i, proj), torch.zeros(size))
            elif not reasons:
                weights.pop(name(i, proj), None)
    return biased, reasons


# -- Hugging Face output ----------------------------------------------------------------------------

_HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


def _rope_parameters(config: ModelConfig) -> dict:
    params: dict = {"rope_type": "default", "rope_theta": config.rope_theta}
    s: RopeScaling | None = config.rope_scaling
    if s is None:
        return params
    if s.kind == "linear":
        return params | {"rope_type": "linear", "factor": s.factor}
    if s.kind == "llama3":
        return params | {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                         "high_freq_factor": s.high_freq_factor,
                         "original_max_position_embeddings": s.original_max_position_embeddings}
    if s.kind == "yarn":
        return params | {"rope_type": "yarn", "factor": s.factor, "attention_factor": s.attention_factor,
                         "beta_fast": s.beta_fast, "beta_slow": s.beta_slow, "truncate": s.truncate,
                         "original_max_position_embeddings": s.original_max_position_embeddings}
    if s.kind == "longrope":
        return params | {"rope_type": "longrope", "short_factor": list(s.freq_factors),
                         "long_factor": list(s.long_factors), "attention_factor": s.attention_factor,
                         "original_max_position_embeddings": s.original_max_position_embeddings}
    raise ConversionError(f"rope scaling {s.kind!r} has no Hugging Face form")


def hf_config(config: ModelConfig, target: Target, tokenizer: Tokenizer | None) -> dict:
    body = {"architectures": [target.architecture], "model_type": target.model_type, "dtype": "float32",
            "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim, "hidden_act": _HF_ACTIVATIONS[config.hidden_act],
            "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
            "tie_word_embeddings": config.tie_word_embeddings, "rope_parameters": _rope_parameters(config)}
    if tokenizer is not None:
        body |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if target.qkv_bias == "optional":
        body |= {"attention_bias": config.attention_bias, "mlp_bias": False}
    if target.windows == "all":
        body["sliding_window"] = config.sliding_window
    if target.windows == "per_layer":
        windowed = [config.layer_window(i) is not None for i in range(config.num_hidden_layers)]
        body |= {"use_sliding_window": any(windowed), "sliding_window": config.sliding_window, "max_window_layers": 0,
                 "layer_types": ["sliding_attention" if w else "full_attention" for w in windowed]}
    return body


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                    "chat_template.jinja", "tokenizer.model")


def write_tokenizer_files(source: ModelSource, tokenizer: Tokenizer, folder: Path) -> None:
    """The source's tokenizer files (a Hugging Face folder's, copied; a GGUF file's, built from its vocabulary)."""
    if source.kind == "hf":
        for name in _TOKENIZER_FILES:
            if (source.path / name).is_file():
                shutil.copyfile(source.path / name, folder / name)
        return
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    spelled = lambda token_id: None if token_id is None else tokenizer.id_to_token(token_id)  # noqa: E731
    config = {"bos_token": spelled(tokenizer.bos_token_id), "eos_token": spelled(tokenizer.eos_token_id),
              "chat_template": tokenizer.chat_template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")


# -- GGUF output: the tokenizer ---------------------------------------------------------------------

def gguf_tokenizer_metadata(source: ModelSource, tokenizer: Tokenizer) -> dict:
    """`tokenizer.*` keys: a GGUF source's, copied; a Hugging Face byte-level BPE vocabulary's, written out
    (its pre-tokenizer named by llama.cpp's name for the same regexes)."""
    if source.kind == "gguf":
        return {k: v for k, v in open_gguf(source.path).metadata.items() if k.startswith("tokenizer.")}
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None:
        raise ConversionError("GGUF export writes byte-level BPE vocabularies whose pre-tokenizer llama.cpp knows; "
                              "this tokenizer is not one (convert from a GGUF file of the model instead)")
    size = tokenizer.backend.get_vocab_size(with_added_tokens=True)
    tokens = [tokenizer.id_to_token(i) or f"[PAD{i}]" for i in range(size)]
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    types = [TOKEN_NORMAL if i not in added else TOKEN_CONTROL if added[i].get("special") else TOKEN_USER_DEFINED
             for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.add_bos_token": tokenizer.add_bos}
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id)):
        if value is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = value
    if tokenizer.chat_template:
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    return meta


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    regexes = tuple(s["pattern"].get("Regex") for s in steps if s.get("type") == "Split" and "pattern" in s)
    if not regexes and any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps):
        return "gpt2"  # the ByteLevel pre-tokenizer's own split is GPT-2's regex
    return next((name for name, known in PRE_TOKENIZER_REGEXES.items() if known == regexes), None)


# -- the command --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvertPlan:
    to: str | None = None  # a family; None: the source's
    quantize: str | None = None  # GGUF weight type (f32 when None)
    tp: int = 1
    pp: int = 1
    merge: bool = False
    merge_lora: str | None = None  # a LoRA adapter (PEFT folder or GGUF LoRA) baked into the weights


def convert(source: ModelSource, out: Path, plan: ConvertPlan) -> str:
    """Write the converted model at `out`; returns a line saying what was written."""
    gguf = out.suffix == ".gguf"
    _check_plan(plan, gguf, source)
    source_config, family = read_model_config(source)
    to = plan.to or source_config.family
    # A GGUF file of the source's own family keeps fused tensors as llama.cpp stores them (Phi-3's qkv).
    same_family_gguf = gguf and to == source_config.family
    config, weights = canonical_weights(source, split=not same_family_gguf,
                                        keep_packed=same_family_gguf and plan.merge_lora is None)
    if plan.merge_lora is not None:
        merge_lora(weights, load_adapter("merged", plan.merge_lora, config, family, model_order=False), config)
    return write_model(source, config, weights, out, plan)


def write_model(source: ModelSource, config: ModelConfig, weights: Weights, out: Path, plan: ConvertPlan) -> str:
    """Write canonical float32 `weights` of a model read from `source` (its tokenizer goes along) at `out`:
    a .gguf file (fused tensors as the family's checkpoints keep them) or a Hugging Face folder."""
    gguf = out.suffix == ".gguf"
    to = plan.to or config.family
    tokenizer = load_tokenizer(source)
    if gguf:
        if to != config.family:
            config, weights = retarget(config, weights, _target(to), GGUF_WINDOWS)
        write_gguf(out, config, weights.items(), gguf_tokenizer_metadata(source, tokenizer), plan.quantize or "f32")
        return f"wrote {out} ({config.family}, {plan.quantize or 'f32'})"
    target = _target(to)
    config, weights = retarget(config, weights, target, target.windows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(config, target, tokenizer), indent=1), encoding="utf-8")
    write_tokenizer_files(source, tokenizer, out)
    for stale in out.glob("*.safetensors"):
        stale.unlink()
    if plan.tp > 1 or plan.pp > 1:
        write_shard_set(out, config, weights, plan.tp, plan.pp)
        return f"wrote {out} ({target.architecture}, {plan.tp} tensor × {plan.pp} pipeline shards)"
    (out / "pagedllm_shards.json").unlink(missing_ok=True)
    save_file(weights, str(out / "model.safetensors"))
    return f"wrote {out} ({target.architecture})"


def merge_lora(weights: Weights, adapter: LoRAAdapter, config: ModelConfig) -> None:
    """W += B·A for every layer the adapter updates (B in the checkpoint's row order), in place; a layer
    the checkpoint keeps fused (Phi-3's qkv_proj) takes each part's update on its rows."""
    for name, update in adapter.updates.items():
        delta = update.b @ update.a
        target, offset, size = tensor_rows(weights, f"{name}.weight", config)
        rows = weights[target].narrow(0, offset, size)
        if rows.shape != delta.shape:
            raise ConversionError(f"--merge-lora: {name} is {tuple(delta.shape)} in the adapter, "
                                  f"{tuple(rows.shape)} in the model: an adapter of another model?")
        rows += delta


def tensor_rows(weights: Weights, name: str, config: ModelConfig) -> tuple[str, int, int]:
    """The tensor holding canonical tensor `name`, the row it starts at and its rows."""
    if name in weights:
        return name, 0, weights[name].shape[0]
    module, part, leaf = name.rsplit(".", 2)
    q, kv, inter = (config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim,
                    config.intermediate_size)
    sizes = {"q_proj": q, "k_proj": kv, "v_proj": kv, "gate_proj": inter, "up_proj": inter}
    for fused, offsets in (("qkv_proj", {"q_proj": 0, "k_proj": q, "v_proj": q + kv}),
                           ("gate_up_proj", {"gate_proj": 0, "up_proj": inter})):
        if part in offsets and f"{module}.{fused}.{leaf}" in weights:
            return f"{module}.{fused}.{leaf}", offsets[part], sizes[part]
    raise ConversionError(f"{name.removesuffix('.weight')}: the model has no such tensor (an adapter or weights "
                          "of another model?)")


def _target(family: str) -> Target:
    if family not in HF_TARGETS:
        raise ConversionError(f"--to {family}: pagedllm writes Hugging Face checkpoints of "
                              f"{', '.join(HF_TARGETS)} (a GGUF file, FILE.gguf, keeps any family as it is)")
    return HF_TARGETS[family]


def _check_plan(plan: ConvertPlan, gguf: bool, source: ModelSource) -> None:
    if plan.quantize is not None and not gguf:
        raise ConversionError("--quantize applies to GGUF output (--out FILE.gguf)")
    if plan.quantize is not None and plan.quantize not in WEIGHT_TYPES:
        raise ConversionError(f"--quantize must be one of {', '.join(WEIGHT_TYPES)}, got {plan.quantize!r}")
    if gguf and (plan.tp > 1 or plan.pp > 1):
        raise ConversionError("--tp/--pp write Hugging Face shards (--out DIR), not a GGUF file")
    if plan.tp < 1 or plan.pp < 1:
        raise ConversionError("--tp and --pp must be at least 1")
    if plan.merge and not (source.kind == "hf" and (source.path / "pagedllm_shards.json").is_file()):
        raise ConversionError("--merge needs a shard set (a folder written with --tp/--pp)")
    if plan.merge and (plan.tp > 1 or plan.pp > 1):
        raise ConversionError("--merge writes one whole checkpoint: leave out --tp/--pp")
