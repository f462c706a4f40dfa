"""Hugging Face folder (config.json + *.safetensors) → ModelConfig + canonical weights."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ...config import ModelConfig, RopeScaling
from ...errors import PagedLLMError
from ..registry import FamilySpec, family_for_hf


class HFModelError(PagedLLMError, ValueError):
    """A Hugging Face model folder that cannot be read."""


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HFModelError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(data, dict):
        raise HFModelError(f"{path}: expected a JSON object")
    return data


def _rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes `rope_parameters`; older configs use rope_theta + rope_scaling.
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            kind="llama3", factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]), high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    raise HFModelError(f"rope scaling {kind!r} is not supported (pagedllm supports linear and llama3)")


def hf_model_config(folder: Path) -> tuple[ModelConfig, FamilySpec]:
    cfg = read_json(folder / "config.json")
    family = family_for_hf(cfg.get("architectures"))
    if cfg.get("mlp_bias"):
        raise HFModelError(f"{folder}: MLP biases (mlp_bias) are not supported")
    if cfg.get("use_sliding_window"):
        raise HFModelError(f"{folder}: per-layer sliding windows (use_sliding_window) are not supported")
    try:
        heads = cfg["num_attention_heads"]
        theta, scaling = _rope(cfg)
        config = ModelConfig(
            family=family.name,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", family.attention_bias)),
            sliding_window=cfg.get("sliding_window") if family.sliding_window else None,
        )
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


def hf_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in safetensors_files(folder):
        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (OSError, RuntimeError, ValueError) as exc:  # safetensors reports bad headers as these
            raise HFModelError(f"{path}: cannot read safetensors ({exc})") from None
