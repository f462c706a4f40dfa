"""gpt-oss's stacked experts in Hugging Face checkpoints → one tensor per expert and projection.

transformers keeps each layer's experts as one tensor per projection, transposed against nn.Linear:
`experts.gate_up_proj` [experts, hidden, 2·width] with gate and up interleaved column by column,
`experts.down_proj` [experts, width, hidden], and their biases [experts, 2·width] / [experts, hidden].
OpenAI's release stores the two matrices in MXFP4 instead: `<proj>_blocks` [experts, out, in / 32, 16] and
`<proj>_scales` [experts, out, in / 32] (gate and up rows interleaved), which stay packed, repacked into
llama.cpp's MXFP4 blocks (layers/quant.py: mxfp4_blocks). Both become the canonical per-expert names
(`mlp.experts.<e>.gate_proj.weight`, …) that GGUF files and the other MoE families load as.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from gguf import GGMLQuantizationType

from ...layers.linear import Weight, WeightLoadError
from ...layers.quant import PackedWeight, mxfp4_blocks

_STACKED = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<proj>gate_up_proj|down_proj)(?P<kind>|_bias|_blocks|_scales)$")


def is_stacked_mxfp4(name: str) -> bool:
    """A stacked expert tensor's MXFP4 blocks (its companion `_scales` holds the exponents)."""
    match = _STACKED.match(name)
    return match is not None and match.group("kind") == "_blocks"


def unstacked_names(name: str, experts: int) -> list[str]:
    """The canonical per-expert weights a stacked `_blocks` tensor of `experts` experts becomes."""
    match = _STACKED.match(name)
    projections = ("gate_proj", "up_proj") if match.group("proj") == "gate_up_proj" else ("down_proj",)
    return [f"{match.group('prefix')}.{e}.{p}.weight" for e in range(experts) for p in projections]


def unstacked_experts(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, Weight]]:
    """The checkpoint's tensors with every stacked expert tensor split per expert; an MXFP4 `_blocks` tensor
    waits for its `_scales` (either may come first)."""
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        match = _STACKED.match(name)
        if match is None:
            yield name, tensor
            continue
        prefix, proj, kind = match.group("prefix", "proj", "kind")
        if kind in ("_blocks", "_scales"):
            parts = pending.setdefault((prefix, proj), {})
            parts[kind] = tensor
            if len(parts) == 2:
                del pending[(prefix, proj)]
                yield from _packed_experts(prefix, proj, parts["_blocks"], parts["_scales"])
            continue
        yield from _float_experts(prefix, proj, kind, tensor, name)
    if pending:
        prefix, proj = next(iter(pending))
        raise WeightLoadError(f"tensor {prefix}.{proj}: MXFP4 blocks without their scales, or scales without blocks")


def _float_experts(prefix: str, proj: str, kind: str, tensor: torch.Tensor, name: str) -> Iterator[tuple[str, Weight]]:
    """A float stack [experts, in, out] (or its bias [experts, out]) as per-expert [out, in] rows."""
    if tensor.dim() != (2 if kind else 3):
        raise WeightLoadError(f"tensor {name!r} has shape {tuple(tensor.shape)}: not a stack of expert "
                              f"{'biases' if kind else 'matrices'}")
    leaf = "bias" if kind else "weight"
    for e, expert in enumerate(tensor):
        rows = expert if kind else expert.t()
        if proj == "down_proj":
            yield f"{prefix}.{e}.down_proj.{leaf}", rows.contiguous()
        else:  # gate and up interleaved: even rows are the gate's
            yield f"{prefix}.{e}.gate_proj.{leaf}", rows[0::2].contiguous()
            yield f"{prefix}.{e}.up_proj.{leaf}", rows[1::2].contiguous()


def _packed_experts(prefix: str, proj: str, blocks: torch.Tensor, scales: torch.Tensor
                    ) -> Iterator[tuple[str, Weight]]:
    name = f"{prefix}.{proj}_blocks"
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.dim() != 4 or blocks.shape[-1] != 16 \
            or tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise WeightLoadError(f"tensor {name!r}: MXFP4 blocks must be uint8 [experts, rows, groups, 16] with uint8 "
                              f"scales [experts, rows, groups], got {tuple(blocks.shape)} and {tuple(scales.shape)}")
    packed = mxfp4_blocks(blocks, scales)  # [experts, rows, groups · 17]
    cols = 32 * blocks.shape[2]
    for e, expert in enumerate(packed):
        if proj == "down_proj":
            yield f"{prefix}.{e}.down_proj.weight", PackedWeight(GGMLQuantizationType.MXFP4, expert, cols)
        else:
            yield f"{prefix}.{e}.gate_proj.weight", PackedWeight(GGMLQuantizationType.MXFP4, expert[0::2].contiguous(), cols)
            yield f"{prefix}.{e}.up_proj.weight", PackedWeight(GGMLQuantizationType.MXFP4, expert[1::2].contiguous(), cols)
