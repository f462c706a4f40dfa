"""GGML block formats that run packed, the tensors that carry them, and torch quantisers.

A `PackedWeight` is what a loader hands over for a quantised checkpoint tensor: its raw blocks
([rows, bytes per row] uint8, usually a view of the memory-mapped file) and the GGML type.
Formats with a kernel (`PACKED_TYPES`) run as they are; every other GGML type is repacked at
load to Q8_0, which holds any of them at least as precisely (8 bits per weight, one scale per
32). Float checkpoints can be quantised at load to Q8_0 (`int8`) or Q4_1 (`int4`).

MXFP4 (gpt-oss's experts): blocks of 32 FP4 (E2M1) values with one power-of-two scale (E8M0), 17 bytes:
the exponent e, then 16 bytes whose low nibbles are values 0-15 and high nibbles 16-31, each nibble an
index into MXFP4_VALUES (twice the E2M1 values), scaled by 2^(e − 128) — llama.cpp's layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

Q = GGMLQuantizationType
PACKED_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.MXFP4)
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # llama.cpp's kvalues_mxfp4
REPACK_TYPE = Q.Q8_0  # what a GGML type without a kernel becomes
QUANTIZE_AT_LOAD = {"int8": Q.Q8_0, "int4": Q.Q4_1}

# Byte offsets of each block's fp16 scale fields (d, and m / dmin where the format has one).
_FP16_FIELDS = {Q.MXFP4: (), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q4_K: (0, 2),
                Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q3_K: (108,)}


@dataclass(frozen=True)
class PackedWeight:
    """A quantised [rows, cols] matrix as GGML blocks: `data` is uint8 [rows, bytes per row]."""

    qtype: GGMLQuantizationType
    data: torch.Tensor
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.cols)

    @property
    def has_kernel(self) -> bool:
        return self.qtype in PACKED_TYPES


def row_bytes(qtype: GGMLQuantizationType, cols: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return cols // block * size


def random_blocks(qtype: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for a [rows, cols] tensor of `qtype`, with finite, small fp16 scales (MXFP4: exponents
    for scales of 2^-11 to 2^-7)."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    if qtype == Q.MXFP4:
        raw[:, 0] = rng.integers(117, 122, raw.shape[0])
    for offset in _FP16_FIELDS[qtype]:
        scales = (rng.random(raw.shape[0]) * 0.02 + 1e-4).astype(np.float16)
        raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(-1)


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float16).contiguous().view(torch.uint8)


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """[rows, cols] float → Q8_0 blocks (fp16 scale, 32 int8), llama.cpp's rounding."""
    blocks = w.float().reshape(w.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.round(blocks / torch.where(d > 0, d, 1)).clamp(-127, 127).to(torch.int8)
    out = torch.cat([_fp16_bytes(d), q.view(torch.uint8)], dim=-1)
    return out.reshape(w.shape[0], -1)


def quantize_q4_1(w: torch.Tensor) -> torch.Tensor:
    """[rows, cols] float → Q4_1 blocks (fp16 scale and min, 16 bytes of nibbles)."""
    blocks = w.float().reshape(w.shape[0], -1, 32)
    low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    d = (high - low) / 15
    q = torch.round((blocks - low) / torch.where(d > 0, d, 1)).clamp(0, 15).to(torch.uint8)
    nibbles = q[..., :16] | (q[..., 16:] << 4)
    out = torch.cat([_fp16_bytes(d), _fp16_bytes(low), nibbles], dim=-1)
    return out.reshape(w.shape[0], -1)


def quantize_mxfp4(w: torch.Tensor) -> torch.Tensor:
    """[rows, cols] float → MXFP4 blocks, llama.cpp's rounding (quantize_row_mxfp4_ref): the exponent from
    the block's largest magnitude, each value the nearest of the 16 (the first of equals)."""
    blocks = w.float().reshape(w.shape[0], -1, 32)
    amax = blocks.abs().amax(-1)
    e = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(1e-38))) - 2 + 127, 0).clamp(0, 255)
    d = torch.ldexp(torch.ones_like(e), (e - 128).to(torch.int32))[..., None]
    values = torch.tensor(MXFP4_VALUES, dtype=torch.float32)
    index = ((values * d[..., None]) - blocks[..., None]).abs().argmin(-1).to(torch.uint8)
    nibbles = index[..., :16] | (index[..., 16:] << 4)
    return torch.cat([e.to(torch.uint8)[..., None], nibbles], dim=-1).reshape(w.shape[0], -1)


def mxfp4_blocks(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """OpenAI's MXFP4 tensors (Hugging Face gpt-oss: `_blocks` [..., groups, 16] with value 2i in byte i's low
    nibble and 2i + 1 in its high one, `_scales` [..., groups] of E8M0 exponents; the same value table and
    scale) → llama.cpp's blocks [..., groups · 17]."""
    index = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2)  # [..., groups, 32] in value order
    nibbles = index[..., :16] | (index[..., 16:] << 4)
    return torch.cat([scales[..., None], nibbles], dim=-1).flatten(-2)


QUANTIZERS = {Q.Q8_0: quantize_q8_0, Q.Q4_1: quantize_q4_1, Q.MXFP4: quantize_mxfp4}


def quantize(w: torch.Tensor, qtype: GGMLQuantizationType) -> PackedWeight:
    block = GGML_QUANT_SIZES[qtype][0]
    if w.dim() != 2 or w.shape[1] % block:
        raise ValueError(f"cannot quantise a {tuple(w.shape)} tensor to {qtype.name} (blocks of {block})")
    return PackedWeight(qtype, QUANTIZERS[qtype](w), w.shape[1])


def _pack_scales_k4(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins per super-block → llama.cpp's 12 bytes (inverse of get_scale_min_k4)."""
    lo_sc, hi_sc, lo_m, hi_m = sc[..., :4], sc[..., 4:], m[..., :4], m[..., 4:]
    return torch.cat([lo_sc | ((hi_sc >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_sc & 0x0F) | ((hi_m & 0x0F) << 4)],
                     dim=-1)


def _k_quant_affine(w: torch.Tensor, levels: int):
    """Per 32-value sub-block: weight ≈ d·sc·q − dmin·m with 6-bit sc, m and q in [0, levels]."""
    blocks = w.float().reshape(w.shape[0], -1, 8, 32)
    low = blocks.amin(-1).clamp(max=0)
    scale, offset = (blocks.amax(-1) - low) / levels, -low
    d, dmin = scale.amax(-1, keepdim=True) / 63, offset.amax(-1, keepdim=True) / 63
    d, dmin = d.to(torch.float16).float(), dmin.to(torch.float16).float()
    sc = torch.round(scale / torch.where(d > 0, d, 1)).clamp(0, 63)
    m = torch.round(offset / torch.where(dmin > 0, dmin, 1)).clamp(0, 63)
    step = (d * sc)[..., None]
    q = torch.round((blocks + (dmin * m)[..., None]) / torch.where(step > 0, step, 1)).clamp(0, levels)
    header = torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), _pack_scales_k4(sc.to(torch.uint8), m.to(torch.uint8))], -1)
    return header, q.to(torch.uint8)  # q: [rows, super-blocks, 8, 32]


def _k_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Sub-blocks 2c and 2c+1 share 32 bytes: low nibbles then high."""
    pairs = q.reshape(*q.shape[:2], 4, 2, 32)
    return (pairs[:, :, :, 0] & 0x0F | (pairs[:, :, :, 1] & 0x0F) << 4).reshape(*q.shape[:2], 128)


def quantize_q4_k(w: torch.Tensor) -> torch.Tensor:
    header, q = _k_quant_affine(w, 15)
    return torch.cat([header, _k_nibbles(q)], dim=-1).reshape(w.shape[0], -1)


def quantize_q5_k(w: torch.Tensor) -> torch.Tensor:
    header, q = _k_quant_affine(w, 31)
    high = (q >> 4).to(torch.int32) << torch.arange(8, dtype=torch.int32)[:, None]  # bit j of qh[l]: sub-block j
    qh = high.sum(-2).to(torch.uint8)
    return torch.cat([header, qh, _k_nibbles(q)], dim=-1).reshape(w.shape[0], -1)


def quantize_q6_k(w: torch.Tensor) -> torch.Tensor:
    """Per 16 values an int8 scale under one fp16 d per 256; weight ≈ d·sc·(q − 32)."""
    groups = w.float().reshape(w.shape[0], -1, 16, 16)
    scale = groups.abs().amax(-1) / 31
    d = (scale.amax(-1, keepdim=True) / 127).to(torch.float16).float()
    sc = torch.round(scale / torch.where(d > 0, d, 1)).clamp(0, 127)
    step = (d * sc)[..., None]
    q = (torch.round(groups / torch.where(step > 0, step, 1)).clamp(-32, 31) + 32).to(torch.uint8)
    q = q.reshape(w.shape[0], -1, 2, 4, 32)  # [rows, super-blocks, half, quarter, 32]
    ql = torch.cat([q[:, :, :, 0] & 0x0F | (q[:, :, :, 2] & 0x0F) << 4,
                    q[:, :, :, 1] & 0x0F | (q[:, :, :, 3] & 0x0F) << 4], dim=-1)  # [rows, sb, half, 64]
    qh = (q[:, :, :, 0] >> 4) | (q[:, :, :, 1] >> 4) << 2 | (q[:, :, :, 2] >> 4) << 4 | (q[:, :, :, 3] >> 4) << 6
    sb = q.shape[1]
    parts = [ql.reshape(w.shape[0], sb, 128), qh.reshape(w.shape[0], sb, 64),
             sc.to(torch.int8).view(torch.uint8).reshape(w.shape[0], sb, 16), _fp16_bytes(d)]
    return torch.cat(parts, dim=-1).reshape(w.shape[0], -1)


QUANTIZERS.update({Q.Q4_K: quantize_q4_k, Q.Q5_K: quantize_q5_k, Q.Q6_K: quantize_q6_k})



