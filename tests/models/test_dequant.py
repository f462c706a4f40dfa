"""Our fast dequantisation paths agree bit for bit with the gguf package (the reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from pagedllm.layers.dequant import _BLOCK_KERNELS, dequantize

Q = GGMLQuantizationType


def _random_bytes(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    block, size = GGML_QUANT_SIZES[qtype]
    return np.random.default_rng(seed).integers(0, 256, rows * cols // block * size, dtype=np.uint8)


@pytest.mark.parametrize("qtype", sorted(_BLOCK_KERNELS, key=lambda q: q.name), ids=lambda q: q.name)
@pytest.mark.filterwarnings("ignore:invalid value")  # random bytes include NaN scales
def test_fast_paths_equal_gguf_on_every_bit_pattern(qtype):
    raw = _random_bytes(qtype, 8, 256)
    ours = dequantize(raw, qtype, (8, 256))
    ref = gguf_quants.dequantize(raw.reshape(-1, GGML_QUANT_SIZES[qtype][1]), qtype).reshape(8, 256)
    np.testing.assert_array_equal(ours.numpy(), ref.astype(np.float32))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0], ids=lambda q: q.name)
def test_quantise_then_dequantise_is_close(qtype):
    x = np.random.default_rng(1).standard_normal((4, 128)).astype(np.float32)
    ours = dequantize(gguf_quants.quantize(x, qtype).reshape(-1), qtype, x.shape)
    assert np.abs(ours.numpy() - x).max() < 0.25


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16], ids=lambda q: q.name)
def test_plain_types(qtype):
    x = torch.randn(3, 32)
    as_type = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}[qtype]
    raw = x.to(as_type).view(torch.uint8).numpy().reshape(-1)
    assert torch.equal(dequantize(raw, qtype, (3, 32)), x.to(as_type).float())


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS], ids=lambda q: q.name)
def test_other_types_go_through_gguf(qtype):
    raw = _random_bytes(qtype, 2, 256, seed=2)
    ours = dequantize(raw, qtype, (2, 256))
    ref = gguf_quants.dequantize(raw.reshape(-1, GGML_QUANT_SIZES[qtype][1]), qtype).reshape(2, 256)
    np.testing.assert_array_equal(ours.numpy(), ref.astype(np.float32))
