"""Tensor- and pipeline-parallel shard sets: a Hugging Face folder whose weights are split over
`model-tp{r}-pp{s}.safetensors` files, one per (tensor rank, pipeline stage), with a manifest
(`pagedllm_shards.json`) saying where each piece of each tensor lies.

A tensor rank's pieces are exactly what that rank holds when pagedllm runs the model under
--tensor-parallel-size (distributed.py): q/k/v rows by whole heads — key/value heads repeated on
each rank that shares them where there are more ranks than key/value heads —, o and down
columns, gate/up rows, the vocabulary's rows; norms (and the biases added after a row-parallel
product) whole on every rank. A pipeline stage holds a contiguous run of layers, the embeddings
on the first stage, the final norm and head on the last (a tied head: the embeddings there too).
The loader merges a set back, checking that repeated pieces agree, so any set loads anywhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ...config import ModelConfig
from ...distributed import TensorParallel, attention_heads, span
from ...errors import ConfigError, ModelSourceError

MANIFEST = "pagedllm_shards.json"
FORMAT = "pagedllm-shards/1"


def is_shard_set(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def shard_file(rank: int, stage: int) -> str:
    return f"model-tp{rank}-pp{stage}.safetensors"


def stages(layers: int, pp: int) -> list[tuple[int, int]]:
    """Each pipeline stage's layers [first, last): contiguous, as even as they go."""
    if pp > layers:
        raise ConfigError(f"{layers} layers cannot be split over {pp} pipeline stages")
    return [(s * layers // pp, (s + 1) * layers // pp) for s in range(pp)]


def _split(name: str, config: ModelConfig, tp: TensorParallel) -> tuple[int | None, int, int]:
    """(dimension, first, end) of this rank's piece of a tensor; dimension None: the whole of it."""
    hd = config.head_dim
    q_first, q_count, kv_first, kv_count = attention_heads(config.num_attention_heads, config.num_key_value_heads, tp)
    inter = span(config.intermediate_size, tp)
    vocab = span(config.vocab_size, tp)
    is_weight = name.endswith(".weight")
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return 0, vocab[0], sum(vocab)
    if ".q_proj." in name:
        return 0, q_first * hd, (q_first + q_count) * hd
    if ".k_proj." in name or ".v_proj." in name:
        return 0, kv_first * hd, (kv_first + kv_count) * hd
    if ".o_proj." in name and is_weight:
        return 1, q_first * hd, (q_first + q_count) * hd
    if ".gate_proj." in name or ".up_proj." in name:
        return 0, inter[0], sum(inter)
    if ".down_proj." in name and is_weight:
        return 1, inter[0], sum(inter)
    return None, 0, 0


def _stages_of(name: str, config: ModelConfig, bounds: list[tuple[int, int]]) -> list[int]:
    last = len(bounds) - 1
    if name.startswith("model.layers."):
        layer = int(name.split(".")[2])
        return [s for s, (first, end) in enumerate(bounds) if first <= layer < end]
    if name == "model.embed_tokens.weight":
        return sorted({0, last}) if config.tie_word_embeddings else [0]
    return [last]  # the final norm and the head


def write_shard_set(folder: Path, config: ModelConfig, weights: dict[str, torch.Tensor], tp: int, pp: int) -> None:
    """Write `weights` split over `tp` tensor ranks and `pp` pipeline stages (a config.json is the caller's)."""
    bounds = stages(config.num_hidden_layers, pp)
    files: dict[str, dict[str, torch.Tensor]] = {shard_file(r, s): {} for r in range(tp) for s in range(pp)}
    tensors: dict[str, dict] = {}
    for name, tensor in weights.items():
        entry = tensors[name] = {"shape": list(tensor.shape), "dim": None, "pieces": []}
        for rank in range(tp):
            dim, first, end = _split(name, config, TensorParallel(rank, tp))
            piece = tensor if dim is None else tensor.narrow(dim, first, end - first)
            entry["dim"] = dim
            for stage in _stages_of(name, config, bounds):
                file = shard_file(rank, stage)
                files[file][name] = piece.contiguous()
                entry["pieces"].append({"file": file, "start": first, "end": end})
    for file, content in files.items():
        save_file(content, str(folder / file))
    manifest = {"format": FORMAT, "tp": tp, "pp": pp, "stages": bounds, "tensors": tensors}
    (folder / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")


def shard_set_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The whole tensors of a shard set, each put back together from its pieces (repeated ones must agree)."""
    manifest = _manifest(folder)
    handles = {}
    try:
        for file in sorted({p["file"] for t in manifest["tensors"].values() for p in t["pieces"]}):
            if not (folder / file).is_file():
                raise ModelSourceError(f"{folder}: shard {file} named in {MANIFEST} is missing")
            handles[file] = safe_open(os.fspath(folder / file), framework="pt")
        for name, entry in manifest["tensors"].items():
            yield name, _merged(name, entry, handles, folder)
    except (KeyError, TypeError, ValueError, OSError, RuntimeError) as exc:
        if isinstance(exc, ModelSourceError):
            raise
        raise ModelSourceError(f"{folder}: shard set is inconsistent ({type(exc).__name__}: {exc})") from None


def _manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSourceError(f"{folder / MANIFEST}: cannot read ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("tensors"), dict):
        raise ModelSourceError(f"{folder / MANIFEST}: not a {FORMAT} manifest")
    return manifest


def _merged(name: str, entry: dict, handles: dict, folder: Path) -> torch.Tensor:
    whole: torch.Tensor | None = None
    covered = None
    for piece in entry["pieces"]:
        part = handles[piece["file"]].get_tensor(name)
        dim = entry["dim"]
        if whole is None:
            whole = torch.empty(entry["shape"], dtype=part.dtype)
            covered = torch.zeros(entry["shape"][dim] if dim is not None else 1, dtype=torch.bool)
        start, end = (0, 1) if dim is None else (piece["start"], piece["end"])
        target = whole if dim is None else whole.narrow(dim, start, end - start)
        if tuple(part.shape) != tuple(target.shape):
            raise ModelSourceError(f"{folder}: {piece['file']} holds {name} as {tuple(part.shape)}, the manifest "
                                   f"says {tuple(target.shape)}")
        if covered[start:end].any() and not torch.equal(target, part):
            raise ModelSourceError(f"{folder}: the shards disagree on {name} (a repeated piece differs)")
        target.copy_(part)
        covered[start:end] = True
    if whole is None or not covered.all():
        raise ModelSourceError(f"{folder}: the shards do not cover all of {name}")
    return whole
