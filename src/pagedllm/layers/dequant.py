"""GGML block formats → float tensors.

The common llama.cpp block types are unpacked with a few vectorised torch ops (several times
faster than numpy on the default model). Every other type the `gguf` package knows (K-quants,
I-quants, …) goes through `gguf.quants.dequantize`, which is the reference for the format; the
tests check our fast paths against it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from ..errors import PagedLLMError

Q = GGMLQuantizationType


class UnreadableQuantizationError(PagedLLMError, ValueError):
    """A quantised tensor in a GGML type that neither pagedllm nor the gguf package can unpack."""


def f16_field(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 scalar stored at byte `start` of each block, as a float32 column."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def block_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Low nibbles hold elements 0..15 of a block, high nibbles 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def fifth_bits(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Q5 blocks keep the fifth bit of all 32 elements in one little-endian uint32."""
    qh = blocks[:, start : start + 4].to(torch.int64)
    bits = qh[:, 0] | qh[:, 1] << 8 | qh[:, 2] << 16 | qh[:, 3] << 24
    shifts = torch.arange(32, dtype=torch.int64)
    return ((bits[:, None] >> shifts) & 1).to(torch.uint8) << 4


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return f16_field(b, 0) * b[:, 2:].view(torch.int8).float()


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return f16_field(b, 0) * (block_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return f16_field(b, 0) * block_nibbles(b[:, 4:]).float() + f16_field(b, 2)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = block_nibbles(b[:, 6:]) | fifth_bits(b, 2)
    return f16_field(b, 0) * (q.float() - 16)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = block_nibbles(b[:, 8:]) | fifth_bits(b, 4)
    return f16_field(b, 0) * q.float() + f16_field(b, 2)


_BLOCK_KERNELS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.Q8_0: _q8_0,
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
}

_PLAIN_DTYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16, Q.F64: torch.float64}


def dequantize(raw: np.ndarray, ggml_type: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """Unpack the raw bytes of one tensor into a float32 tensor of `shape` (torch order)."""
    data = torch.from_numpy(np.array(raw, copy=True))  # own the bytes: the file map is read-only
    if ggml_type in _PLAIN_DTYPES:
        return data.view(_PLAIN_DTYPES[ggml_type]).float().reshape(shape)
    if ggml_type in _BLOCK_KERNELS:
        _, type_size = GGML_QUANT_SIZES[ggml_type]
        return _BLOCK_KERNELS[ggml_type](data.view(-1, type_size)).reshape(shape)
    return _dequantize_with_gguf(raw, ggml_type, shape)


def _dequantize_with_gguf(raw: np.ndarray, ggml_type: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    _, type_size = GGML_QUANT_SIZES[ggml_type]
    try:
        values = gguf_quants.dequantize(np.asarray(raw).reshape(-1, type_size), ggml_type)
    except NotImplementedError:
        raise UnreadableQuantizationError(f"quantisation type {ggml_type.name} cannot be dequantised by the gguf package") from None
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)
