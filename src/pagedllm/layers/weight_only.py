"""Weight-only quantised linear layers for GPUs: integer weights, float activations.

A weight is stored as integers with a float scale (and, for asymmetric formats, a minimum) per
group of G input columns: w = q · scale + min. Every GGML format the CPU kernels run maps onto
this exactly — Q8_0 (int8, G 32), Q4_0 / Q4_1 / Q4_K (4-bit, G 32), Q5_0 / Q5_1 / Q5_K (5-bit
values held as int8, G 32), Q6_K (6-bit held as int8, G 16), MXFP4 (its table values −12..12 held as
int8, G 32, the power-of-two scale exact in float16 down to 2⁻²⁴) — with the scales in float16 (a
K-quant's super-block scale × sub-block scale is rounded there, 2⁻¹¹ relative). Other GGML types
are repacked to Q8_0 first, as on the CPU; float checkpoints quantised at load (`--quantization
int8|int4`) go through Q8_0 / Q4_1.

4-bit values are packed two to a byte, in tiles of `tile` columns: byte j of a tile holds column
j in its low nibble and column j + tile/2 in its high one (GGML's own layout at tile 32), so a
kernel unpacks a tile into two halves without shuffling.

The product runs in a Triton kernel on a CUDA device (layers/weight_only_kernels.py: each weight
tile is dequantised in registers and multiplied with tl.dot, so the weights cross memory once, as
integers), or anywhere under TRITON_INTERPRET=1; elsewhere the weight is dequantised a tile of
rows at a time and multiplied with torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..attention.triton import triton_available
from .dequant import block_nibbles, dequantize, f16_field, fifth_bits
from .linear import LinearMethod, Weight
from .quant import MXFP4_VALUES, REPACK_TYPE, PackedWeight, quantize

Q = GGMLQuantizationType
DEQUANT_TILE_BYTES = 32 * 2**20  # float rows dequantised at once on the torch path


@dataclass
class GroupQuantized:
    """[rows, cols] weights: w = q · scale + min per group of `group` columns (min may be absent).

    q: int8 [rows, cols], or, at `bits` 4, uint8 [rows, cols / 2] packed in tiles (module doc).
    scale, min: float16 [rows, cols / group]."""

    q: torch.Tensor
    scale: torch.Tensor
    min: torch.Tensor | None
    group: int
    bits: int
    tile: int = 0  # 4-bit packing tile, 0 for int8

    @property
    def rows(self) -> int:
        return self.q.shape[0]

    @property
    def cols(self) -> int:
        return self.scale.shape[1] * self.group

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.min) if t is not None)

    def int8_values(self) -> torch.Tensor:
        """q as int8 [rows, cols] (4-bit values unpacked)."""
        if self.bits == 8:
            return self.q
        packed = self.q.reshape(self.rows, -1, self.tile // 2)
        return torch.cat([packed & 0x0F, packed >> 4], dim=-1).reshape(self.rows, -1).to(torch.int8)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        values = self.int8_values().float().reshape(self.rows, -1, self.group)
        w = values * self.scale.float()[..., None]
        if self.min is not None:
            w = w + self.min.float()[..., None]
        return w.reshape(self.rows, self.cols).to(dtype)

    def select_rows(self, rows: torch.Tensor | slice) -> "GroupQuantized":
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return GroupQuantized(pick(self.q), pick(self.scale), pick(self.min), self.group, self.bits, self.tile)

    def row_tiles(self, float_bytes: int) -> Iterator["GroupQuantized"]:
        """Consecutive slices of rows, each at most `float_bytes` once dequantised to float32 (views)."""
        step = max(1, float_bytes // (4 * self.cols))
        return (self.select_rows(slice(start, start + step)) for start in range(0, self.rows, step))

    def to(self, device: torch.device | str) -> "GroupQuantized":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return GroupQuantized(move(self.q), move(self.scale), move(self.min), self.group, self.bits, self.tile)


def pack_int4(values: torch.Tensor, tile: int) -> torch.Tensor:
    """uint8 [rows, cols / 2] from values 0..15 [rows, cols]: the tile layout of the module doc."""
    rows = values.shape[0]
    tiles = values.to(torch.uint8).reshape(rows, -1, 2, tile // 2)
    return (tiles[:, :, 0] | tiles[:, :, 1] << 4).reshape(rows, -1)


def unify(parts: list[GroupQuantized], tile: int) -> GroupQuantized:
    """The shards of a fused layer in one storage, without loss: 4-bit only if all are, the
    smallest group (a larger group's scales repeated), mins where any shard has them."""
    group = min(p.group for p in parts)
    bits = 4 if all(p.bits == 4 for p in parts) else 8
    with_min = any(p.min is not None for p in parts)

    def regroup(t: torch.Tensor, p: GroupQuantized) -> torch.Tensor:
        return t.repeat_interleave(p.group // group, dim=1)

    qs = [p.int8_values() for p in parts]
    q = torch.cat(qs)
    q = pack_int4(q, tile) if bits == 4 else q
    scale = torch.cat([regroup(p.scale, p) for p in parts])
    mins = torch.cat([regroup(p.min if p.min is not None else torch.zeros_like(p.scale), p) for p in parts]) \
        if with_min else None
    return GroupQuantized(q, scale, mins, group, bits, tile if bits == 4 else 0)


# ---- GGML blocks → groups ------------------------------------------------------------------------

def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: the eight 6-bit sub-block scales and mins packed in bytes 4..15."""
    s = blocks[..., 4:16].to(torch.int32)
    low = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], dim=-1)
    mins = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], dim=-1)
    return low.float(), mins.float()


def _k_low_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes → 256 values: bytes 32c..32c+31 hold sub-block 2c (low) and 2c+1 (high)."""
    chunks = qs.reshape(*qs.shape[:-1], 4, 32)
    return torch.stack([chunks & 0x0F, chunks >> 4], dim=-2).reshape(*qs.shape[:-1], 256)


def _from_q8_0(b):
    return b[..., 2:].view(torch.int8), f16_field(b, 0), None, 32


def _from_q4_0(b):
    d = f16_field(b, 0)
    return block_nibbles(b[..., 2:]), d, -8 * d, 32


def _from_q4_1(b):
    return block_nibbles(b[..., 4:]), f16_field(b, 0), f16_field(b, 2), 32


def _from_q5_0(b):
    return (block_nibbles(b[..., 6:]) | fifth_bits(b, 2)).to(torch.int8) - 16, f16_field(b, 0), None, 32


def _from_q5_1(b):
    return block_nibbles(b[..., 8:]) | fifth_bits(b, 4), f16_field(b, 0), f16_field(b, 2), 32


def _k_affine(b, q):
    sc, m = _k_scales(b)
    return q, f16_field(b, 0) * sc, -f16_field(b, 2) * m, 32


def _from_q4_k(b):
    return _k_affine(b, _k_low_nibbles(b[..., 16:144]))


def _from_q5_k(b):
    high = (b[..., 16:48, None] >> torch.arange(8, dtype=torch.uint8)) & 1  # [.., l, sub-block]
    fifth = high.transpose(-1, -2).reshape(*b.shape[:-1], 256) << 4
    return _k_affine(b, _k_low_nibbles(b[..., 48:176]) | fifth)


def _from_q6_k(b):
    ql, qh = b[..., 0:128].reshape(*b.shape[:-1], 2, 64), b[..., 128:192].reshape(*b.shape[:-1], 2, 32)
    low = torch.stack([ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4], dim=-2)
    high = torch.stack([(qh >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-2)
    q = (low | high << 4).reshape(*b.shape[:-1], 256).to(torch.int8) - 32
    return q, f16_field(b, 208) * b[..., 192:208].view(torch.int8).float(), None, 16


def _from_mxfp4(b):
    values = torch.tensor(MXFP4_VALUES, dtype=torch.int8)[block_nibbles(b[..., 1:]).long()]
    scale = torch.ldexp(torch.ones(b.shape[:-1]), b[..., 0].to(torch.int32) - 128)[..., None]
    return values, scale, None, 32


_FROM_BLOCKS = {Q.Q8_0: _from_q8_0, Q.Q4_0: _from_q4_0, Q.Q4_1: _from_q4_1, Q.Q5_0: _from_q5_0,
                Q.Q5_1: _from_q5_1, Q.Q4_K: _from_q4_k, Q.Q5_K: _from_q5_k, Q.Q6_K: _from_q6_k, Q.MXFP4: _from_mxfp4}
_FOUR_BIT = (Q.Q4_0, Q.Q4_1, Q.Q4_K)


def from_packed(weight: PackedWeight, tile: int) -> GroupQuantized:
    """GGML blocks as groups (module doc); a type without a mapping is repacked to Q8_0 first."""
    if weight.qtype not in _FROM_BLOCKS:
        weight = quantize(dequantize(weight.data.numpy(), weight.qtype, weight.shape), REPACK_TYPE)
    rows, cols = weight.shape
    _, block_bytes = GGML_QUANT_SIZES[weight.qtype]
    blocks = weight.data.reshape(-1, block_bytes)
    q, scale, mins, group = _FROM_BLOCKS[weight.qtype](blocks)
    q = q.reshape(rows, cols)
    scale = scale.reshape(rows, -1).to(torch.float16)
    mins = None if mins is None else mins.reshape(rows, -1).to(torch.float16)
    if weight.qtype in _FOUR_BIT:
        return GroupQuantized(pack_int4(q, tile), scale, mins, group, 4, tile)
    return GroupQuantized(q.to(torch.int8), scale, mins, group, 8)


# ---- the linear method ---------------------------------------------------------------------------

def packing_tile(cols: int) -> int:
    return 64 if cols % 64 == 0 else 32


def use_triton(device: torch.device) -> bool:
    """The kernel runs on CUDA, or anywhere under Triton's interpreter (the CPU tests)."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    return triton_available() and (device.type == "cuda" or interpreting)


@dataclass
class WeightOnlyMethod(LinearMethod):
    """Integer weights in groups (GroupQuantized) on the model's device, float activations.
    `quantize_to`: what float checkpoint tensors become (Q8_0: int8, Q4_1: int4)."""

    quantize_to: GGMLQuantizationType = REPACK_TYPE
    device: str = "cuda"

    def create_weights(self, layer) -> None:
        layer.parts = [None] * len(layer.shard_sizes)
        layer.quantized = None

    def load(self, layer, shard: int, tensor: Weight) -> None:
        if not isinstance(tensor, PackedWeight):
            tensor = quantize(tensor, self.quantize_to)
        layer.parts[shard] = from_packed(tensor, packing_tile(layer.in_features))

    def finish(self, layer) -> None:
        parts = layer.parts
        merged = parts[0] if len(parts) == 1 else unify(parts, packing_tile(layer.in_features))
        layer.quantized = merged.to(self.device)
        layer.parts = None  # the host copies go

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, layer.in_features)
        if use_triton(rows.device):
            from .weight_only_kernels import weight_only_matmul

            out = weight_only_matmul(rows, layer.quantized)
        else:
            out = self._dequantized_matmul(rows, layer.quantized)
        return out.reshape(*x.shape[:-1], layer.out_features)

    @staticmethod
    def _dequantized_matmul(x: torch.Tensor, w: GroupQuantized) -> torch.Tensor:
        """A tile of weight rows dequantised at a time: never the whole matrix in float."""
        return torch.cat([F.linear(x, tile.dequantize(x.dtype)) for tile in w.row_tiles(DEQUANT_TILE_BYTES)], dim=-1)

    def embedding(self, layer, ids: torch.Tensor) -> torch.Tensor:
        rows = layer.quantized.select_rows(ids.reshape(-1))
        return rows.dequantize(torch.float32).reshape(*ids.shape, layer.in_features)

    def weight_bytes(self, layer) -> int:
        if layer.quantized is not None:
            return layer.quantized.nbytes()
        return sum(p.nbytes() for p in layer.parts if p is not None)

    def row_norms(self, layer) -> torch.Tensor:
        return torch.cat([tile.dequantize().norm(dim=1) for tile in layer.quantized.row_tiles(DEQUANT_TILE_BYTES)])

