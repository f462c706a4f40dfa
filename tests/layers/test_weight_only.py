"""Weight-only integer groups (the GPU's quantised weights): every GGML format the CPU kernels run
maps onto them (exactly, or to float16 scale rounding for K-quants), fused shards of mixed formats
merge without loss, and the Triton kernel — run by Triton's interpreter on the CPU, compiled on a
GPU — equals dequantise-then-multiply for int8 and 4-bit tiles, decode and prefill row counts."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported

from pagedllm.attention.triton import triton_available
from pagedllm.layers.dequant import dequantize
from pagedllm.layers.linear import Linear
from pagedllm.layers.quant import PACKED_TYPES, PackedWeight, random_blocks
from pagedllm.layers.weight_only import WeightOnlyMethod, from_packed, unify

Q = GGMLQuantizationType
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed (make test installs it)")
K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)  # scales are super-block × sub-block products, rounded to float16


def _packed(qtype: Q, rows: int, cols: int, seed: int = 0) -> PackedWeight:
    raw = random_blocks(qtype, rows, cols, np.random.default_rng(seed))
    return PackedWeight(qtype, torch.from_numpy(raw).reshape(rows, -1), cols)


def _reference(weight: PackedWeight) -> torch.Tensor:
    return dequantize(weight.data.numpy(), weight.qtype, weight.shape)


@pytest.mark.parametrize("qtype", PACKED_TYPES + (Q.Q3_K,), ids=lambda q: q.name)
@pytest.mark.parametrize("tile", [32, 64])
def test_groups_hold_every_format(qtype, tile):
    """A type without a mapping (Q3_K) goes through Q8_0, as on the CPU: within its rounding."""
    weight = _packed(qtype, 8, 512)
    groups = from_packed(weight, tile)
    ref = _reference(weight)
    assert groups.bits == (4 if qtype in (Q.Q4_0, Q.Q4_1, Q.Q4_K) else 8)
    if qtype in K_QUANTS:  # float16 rounding of each group's scale and min: far below one step
        g = groups.group
        span = groups.scale.float().abs() * 63 + (groups.min.float().abs() if groups.min is not None else 0)
        bound = span.repeat_interleave(g, dim=1) * 2**-10
        assert ((groups.dequantize() - ref).abs() <= bound).all()
    elif qtype == Q.Q3_K:
        step = ref.abs().reshape(8, -1, 32).amax(-1, keepdim=True) / 127
        assert ((groups.dequantize() - ref).abs().reshape(8, -1, 32) <= step * 0.57).all()  # half a step, and the scale's float16 rounding
    else:
        torch.testing.assert_close(groups.dequantize(), ref, rtol=0, atol=0)
    assert groups.nbytes() < ref.numel() * 4 / 3


def test_fused_shards_of_mixed_formats_merge_without_loss():
    weights = [_packed(Q.Q4_K, 8, 256, 1), _packed(Q.Q6_K, 4, 256, 2), _packed(Q.Q4_0, 4, 256, 3)]
    parts = [from_packed(w, 64) for w in weights]
    merged = unify(parts, 64)
    assert merged.bits == 8 and merged.group == 16 and merged.min is not None
    torch.testing.assert_close(merged.dequantize(), torch.cat([p.dequantize() for p in parts]), rtol=0, atol=0)
    four_bit = unify([from_packed(weights[0], 64), from_packed(weights[2], 64)], 64)
    assert four_bit.bits == 4
    torch.testing.assert_close(four_bit.dequantize(), torch.cat([parts[0].dequantize(), parts[2].dequantize()]))


def _layer(qtypes: list[Q], out_rows: list[int], cols: int) -> Linear:
    layer = Linear(cols, sum(out_rows), shard_sizes=tuple(out_rows), method=WeightOnlyMethod(device=DEVICE))
    for shard, (qtype, rows) in enumerate(zip(qtypes, out_rows)):
        layer.load_shard(shard, _packed(qtype, rows, cols, shard), f"w{shard}")
    layer.method.finish(layer)
    return layer


@needs_triton
@pytest.mark.parametrize("qtypes,cols", [  # 4-bit tiles of 32 columns (96) and of 64 (256)
    ([Q.Q8_0], 96), ([Q.Q4_1], 96), ([Q.Q4_0, Q.Q4_1], 96), ([Q.Q5_1], 96), ([Q.Q8_0], 256), ([Q.Q4_1], 256),
    ([Q.Q4_0, Q.Q4_K], 256), ([Q.Q6_K, Q.Q5_K, Q.Q5_0], 256)], ids=lambda v: v if isinstance(v, int) else
    "+".join(t.name for t in v))
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_triton_kernel_equals_dequantise_then_multiply(qtypes, cols, tokens):
    layer = _layer(qtypes, [48, 16, 16][:len(qtypes)], cols)
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens)).to(DEVICE)
    want = F.linear(x, layer.quantized.dequantize())
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    torch.testing.assert_close(layer.method._dequantized_matmul(x, layer.quantized), want, rtol=1e-4,
                               atol=1e-4 * want.abs().max().item())


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_kernel_in_half_precision(dtype):
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton 3.9's interpreter multiplies bfloat16 tl.dot operands wrongly (~1e10 off on "
                    "plain 16x16 tiles); the kernel runs in bfloat16 on a GPU")
    layer = _layer([Q.Q4_K, Q.Q8_0], [64, 64], 256)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    want = F.linear(x, layer.quantized.dequantize())
    got = layer(x.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_embedding_rows_and_row_norms_read_the_groups():
    layer = _layer([Q.Q4_K], [64], 256)
    dense = layer.quantized.dequantize()
    ids = torch.tensor([[3, 0], [63, 3]], device=DEVICE)
    torch.testing.assert_close(layer.method.embedding(layer, ids), dense[ids])
    torch.testing.assert_close(layer.method.row_norms(layer), dense.norm(dim=1))
    assert layer.method.weight_bytes(layer) == layer.quantized.nbytes() < dense.numel()
