"""The stored forms of the hybrid models' mixers (LFM2's short convolutions, Gated DeltaNet): llama.cpp's,
both ways, and Qwen3-Next checkpoints' projections grouped by key head.

The metadata: each layer's mixer (LFM2: a layer without key/value heads is a convolution; Qwen3.5 and
Qwen3-Next: `attention.recurrent_layers`, or every `full_attention_interval`-th layer attends) and the
`ssm.*` sizes. The tensors llama.cpp's converter stores otherwise than the checkpoints: A as −e^A_log,
convolutions without their middle axis, Qwen3-Next's [b a] rows grouped per key head (`ssm_ba`), and
Qwen3.5's value heads tiled rather than grouped by key head (ModelConfig.linear_value_heads_tiled says
which order a model's weights are in; the layer reads either).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from ...config import ModelConfig
from ...layers.linear import Weight
from ...layers.quant import PackedWeight
from ..registry import FamilySpec
from .gguf_file import GGUFError, GGUFFile

_CONVOLUTIONS = (".conv.conv.weight", ".linear_attn.conv1d.weight")


# -- metadata -------------------------------------------------------------------------------------------

def gguf_layer_count(f: GGUFFile, arch: str, block_count: int) -> int:
    """The model's layers: block_count less the multi-token-prediction blocks Qwen3.5/Qwen3-Next files may
    carry at the end (`nextn_predict_layers`; pagedllm does not load them)."""
    extra = f.get(f"{arch}.nextn_predict_layers", 0)
    if not isinstance(extra, int) or isinstance(extra, bool) or not 0 <= extra < block_count:
        raise GGUFError(f"{f.path}: metadata {arch + '.nextn_predict_layers'!r} should be a count below block_count")
    return block_count - extra


def gguf_mixer_fields(f: GGUFFile, arch: str, family: FamilySpec, layers: int) -> dict:
    """ModelConfig's hybrid fields from a file of a hybrid architecture (empty for the others)."""
    if family.gguf_mixer == "short_conv":
        kv_heads = _per_layer_ints(f, f"{arch}.attention.head_count_kv", layers)
        return dict(layer_mixers=tuple("attention" if n else "short_conv" for n in kv_heads),
                    num_key_value_heads=max(kv_heads), conv_kernel=_count(f, f"{arch}.shortconv.l_cache"),
                    conv_bias=any(name.endswith("shortconv.conv.bias") for name in f.tensors))
    if family.gguf_mixer != "gated_delta_net":
        return {}
    value_heads, inner = _count(f, f"{arch}.ssm.time_step_rank"), _count(f, f"{arch}.ssm.inner_size")
    if inner % value_heads:
        raise GGUFError(f"{f.path}: {arch}.ssm.inner_size {inner} is not a multiple of ssm.time_step_rank {value_heads}")
    return dict(layer_mixers=_recurrent_layers(f, arch, layers), conv_kernel=_count(f, f"{arch}.ssm.conv_kernel"),
                linear_num_key_heads=_count(f, f"{arch}.ssm.group_count"), linear_num_value_heads=value_heads,
                linear_key_head_dim=_count(f, f"{arch}.ssm.state_size"), linear_value_head_dim=inner // value_heads,
                linear_value_heads_tiled=family.gguf_value_heads_tiled)


def _recurrent_layers(f: GGUFFile, arch: str, layers: int) -> tuple[str, ...]:
    key = f"{arch}.attention.recurrent_layers"
    flags = f.get(key)
    if flags is None:  # llama.cpp's default: every interval-th layer attends
        interval = _count(f, f"{arch}.full_attention_interval", 4)
        return tuple("attention" if (i + 1) % interval == 0 else "gated_delta_net" for i in range(layers))
    if not isinstance(flags, np.ndarray) or flags.ndim != 1 or len(flags) < layers or flags.dtype.kind not in "biu":
        raise GGUFError(f"{f.path}: metadata {key!r} should hold one flag per layer ({layers})")
    return tuple("gated_delta_net" if flag else "attention" for flag in flags[:layers])


def _per_layer_ints(f: GGUFFile, key: str, layers: int) -> list[int]:
    value = f.require(key)
    if isinstance(value, np.ndarray) and value.shape == (layers,) and value.dtype.kind in "iu" \
            and 0 <= value.min() and value.max() > 0:
        return [int(v) for v in value]
    raise GGUFError(f"{f.path}: metadata {key!r} should hold one count per layer ({layers}), some of them positive")


def _count(f: GGUFFile, key: str, default: int | None = None) -> int:
    value = f.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 2**20:
        raise GGUFError(f"{f.path}: metadata {key!r} should be a positive count, got "
                        f"{'nothing' if value is None else type(value).__name__}")
    return value


def write_mixer_metadata(writer, arch: str, c: ModelConfig) -> None:
    """The keys gguf_mixer_fields reads, as llama.cpp's converter writes them (`writer`: a GGUFWriter)."""
    if "short_conv" in c.layer_mixers:  # the layers' kinds go in head_count_kv
        writer.add_uint32(f"{arch}.shortconv.l_cache", c.conv_kernel)
        return
    writer.add_ssm_conv_kernel(c.conv_kernel)
    writer.add_ssm_state_size(c.linear_key_head_dim)
    writer.add_ssm_group_count(c.linear_num_key_heads)
    writer.add_ssm_time_step_rank(c.linear_num_value_heads)
    writer.add_ssm_inner_size(c.linear_value_dim)
    writer.add_array(f"{arch}.attention.recurrent_layers", [m == "gated_delta_net" for m in c.layer_mixers])
    if arch in ("qwen35", "qwen35moe"):  # llama.cpp requires M-RoPE's sections; for text any split is the same
        pairs = c.rope_dims // 2
        first = -(-pairs // 3)
        second = -(-(pairs - first) // 2)
        writer.add_rope_dimension_sections([first, second, pairs - first - second, 0])


# -- tensors ----------------------------------------------------------------------------------------------

def from_gguf(name: str, tensor: Weight, config: ModelConfig) -> Iterator[tuple[str, Weight]]:
    """A canonical-named tensor as read from a file, in the checkpoint's form."""
    if name.endswith(".linear_attn.A_log"):
        if isinstance(tensor, PackedWeight) or not bool((tensor < 0).all()) or not bool(tensor.isfinite().all()):
            raise GGUFError(f"tensor {name!r} (llama.cpp's ssm_a, −e^A_log): its values must be finite and "
                            "negative, stored as floats")
        yield name, torch.log(-tensor)
    elif name.endswith(_CONVOLUTIONS):
        yield name, _dense(name, tensor).unsqueeze(1)  # [channels, taps] → Conv1d's [channels, 1, taps]
    elif name.endswith((".in_proj_ba.weight", ".in_proj_qkvz.weight")):
        yield from ungrouped_delta_net(name, tensor, config)
    else:
        yield name, tensor


_GROUPED_PARTS = {".in_proj_qkvz.weight": (".in_proj_qkv.weight", ".in_proj_z.weight"),
                  ".in_proj_ba.weight": (".in_proj_b.weight", ".in_proj_a.weight")}


def loaded_names(canonical: str) -> list[str]:
    """The canonical tensors a file's tensor loads as (Qwen3-Next's grouped projections: their parts)."""
    for grouped, parts in _GROUPED_PARTS.items():
        if canonical.endswith(grouped):
            return [canonical.removesuffix(grouped) + part for part in parts]
    return [canonical]


def to_gguf(name: str, tensor: torch.Tensor, config: ModelConfig, family: FamilySpec) -> torch.Tensor:
    """The inverse of from_gguf for one float tensor (Qwen3-Next's in_proj_b and _a: grouped_ba)."""
    if name.endswith(".linear_attn.A_log"):
        tensor = -tensor.exp()
    elif name.endswith(_CONVOLUTIONS):
        tensor = tensor.squeeze(1)
    if family.gguf_value_heads_tiled and not config.linear_value_heads_tiled and ".linear_attn." in name:
        tensor = tiled_value_heads(name, tensor, config)
    return tensor


def grouped_ba(weights: Iterable[tuple[str, torch.Tensor]], config: ModelConfig
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """Canonical tensors with each layer's in_proj_b and in_proj_a joined as Qwen3-Next's files keep them
    (in_proj_ba: per key head, its value heads' b rows then their a rows)."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    groups = config.linear_num_key_heads
    for name, tensor in weights:
        if not name.endswith((".in_proj_b.weight", ".in_proj_a.weight")):
            yield name, tensor
            continue
        layer, part, _ = name.rsplit(".", 2)
        pair = pending.setdefault(layer, {})
        pair[part] = tensor.reshape(groups, -1, tensor.shape[-1])
        if len(pair) == 2:
            del pending[layer]
            yield f"{layer}.in_proj_ba.weight", torch.cat([pair["in_proj_b"], pair["in_proj_a"]], 1).flatten(0, 1)
    if pending:
        raise ValueError(f"in_proj_b or in_proj_a missing in {', '.join(sorted(pending))}")


def head_count_kv(c: ModelConfig) -> int | list[int]:
    """llama.cpp's key/value head count: per layer where some layers are convolutions (LFM2: 0 there)."""
    if c.layer_mixers is None or "short_conv" not in c.layer_mixers:
        return c.num_key_value_heads
    return [0 if m == "short_conv" else c.num_key_value_heads for m in c.layer_mixers]


def ungrouped_delta_net(name: str, tensor: Weight, config: ModelConfig) -> Iterator[tuple[str, Weight]]:
    """Gated DeltaNet projections with rows grouped by key head (Qwen3-Next's checkpoints: [q k v z] and
    [b a] per group) as Qwen3.5's flat in_proj_qkv (all q, all k, all v), in_proj_z, in_proj_b, in_proj_a."""
    groups, key_dim = config.linear_num_key_heads, config.linear_key_head_dim
    per_group = config.linear_num_value_heads // groups
    value_rows = per_group * config.linear_value_head_dim
    prefix = name.rsplit(".", 2)[0]
    if ".in_proj_qkvz." in name:
        parts = _grouped_rows(tensor, groups, [key_dim, key_dim, value_rows, value_rows])
        yield f"{prefix}.in_proj_qkv.weight", _cat_rows(parts[:3])
        yield f"{prefix}.in_proj_z.weight", parts[3]
    else:
        b, a = _grouped_rows(tensor, groups, [per_group, per_group])
        yield f"{prefix}.in_proj_b.weight", b
        yield f"{prefix}.in_proj_a.weight", a


def _grouped_rows(tensor: Weight, groups: int, sizes: list[int]) -> list[Weight]:
    """Rows in `groups` groups, each `sizes` long parts in turn → each part's rows of every group."""
    rows = tensor.data if isinstance(tensor, PackedWeight) else tensor
    parts = rows.reshape(groups, -1, *rows.shape[1:]).split(sizes, dim=1)
    flat = [p.flatten(0, 1).contiguous() for p in parts]
    if isinstance(tensor, PackedWeight):
        return [PackedWeight(tensor.qtype, p, tensor.cols) for p in flat]
    return flat


def _cat_rows(parts: list[Weight]) -> Weight:
    if isinstance(parts[0], PackedWeight):
        return PackedWeight(parts[0].qtype, torch.cat([p.data for p in parts]), parts[0].cols)
    return torch.cat(parts)


def tiled_value_heads(name: str, tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """A Gated DeltaNet tensor with its value heads reordered from grouped by key head (g·r + j) to
    tiled (j·key heads + g), along the axis that holds them; its q and k rows stay."""
    groups, per_group = config.linear_num_key_heads, config.linear_num_value_heads // config.linear_num_key_heads
    value_dim = config.linear_value_head_dim
    if per_group == 1 or name.endswith(".norm.weight"):
        return tensor
    if name.endswith((".in_proj_qkv.weight", ".conv1d.weight")):
        keys = 2 * groups * config.linear_key_head_dim
        return torch.cat([tensor[:keys], _tile(tensor[keys:], 0, groups, per_group, value_dim)])
    if name.endswith(".out_proj.weight"):
        return _tile(tensor, 1, groups, per_group, value_dim)
    size = value_dim if name.endswith(".in_proj_z.weight") else 1  # b, a, dt_bias and A_log: one per head
    return _tile(tensor, 0, groups, per_group, size)


def _tile(tensor: torch.Tensor, dim: int, groups: int, per_group: int, size: int) -> torch.Tensor:
    shape = tensor.shape
    split = tensor.reshape(*shape[:dim], groups, per_group, size, *shape[dim + 1:])
    return split.transpose(dim, dim + 1).reshape(shape)


def _dense(name: str, tensor: Weight) -> torch.Tensor:
    if isinstance(tensor, PackedWeight):
        raise GGUFError(f"{name}: a convolution's weights stored quantised (llama.cpp keeps them as floats)")
    return tensor
