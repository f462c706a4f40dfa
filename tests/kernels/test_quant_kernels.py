"""Packed-weight kernels against the reference: the gguf package's dequantisation, then float math.

Every format, every instruction-set path this CPU runs, several row counts and odd shapes.
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from pagedllm.kernels import available_isas, quant_kernels_available
from pagedllm.layers.quant import PACKED_TYPES, random_blocks

Q = GGMLQuantizationType
ISAS = available_isas() if quant_kernels_available() else ()


def _reference_weights(raw: np.ndarray, qtype: Q, n: int, k: int) -> torch.Tensor:
    block_bytes = GGML_QUANT_SIZES[qtype][1]
    values = gguf_quants.dequantize(raw.reshape(-1, block_bytes), qtype).reshape(n, k)
    return torch.from_numpy(values.astype(np.float64))


def _q8_roundtrip(x: torch.Tensor, levels: int = 127) -> torch.Tensor:
    """The activations as the kernel sees them: int8 (or 15-bit) blocks of 32 with one float scale."""
    blocks = x.reshape(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / levels
    q = torch.where(d > 0, torch.round(blocks / torch.where(d > 0, d, 1)), 0)
    return (q * d).reshape(x.shape).double()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", PACKED_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("m", [1, 2, 7, 64])
@pytest.mark.parametrize("activations", ["int8", "15-bit"])
def test_integer_matmul_matches_reference(qtype, isa, m, activations):
    k = 512 if GGML_QUANT_SIZES[qtype][0] == 256 else 224  # 2 super-blocks; 7 blocks (a group of four and three)
    n = 37  # weight rows in tiles of four and a remainder
    raw = random_blocks(qtype, n, k, np.random.default_rng(m))
    w = torch.from_numpy(raw.reshape(n, -1))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    ops = torch.ops.pagedllm_quant
    isa_id = available_isas().index(isa)
    out = torch.empty(m, n)
    if activations == "int8":
        ops.matmul_q8(ops.quantize_q8(x, isa_id), [w], [int(qtype)], k, out, isa_id)
    else:
        ops.matmul_q15(x, [w], [int(qtype)], k, out, isa_id)
    ref = _q8_roundtrip(x, 127 if activations == "int8" else 127 * 128) @ _reference_weights(raw, qtype, n, k).T
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("isa", ISAS)
def test_15_bit_activations_are_close_to_float(isa):
    """The output head's path: 15-bit rounding of x leaves the product within 1e-4 of float's."""
    n, k = 64, 576
    raw = random_blocks(Q.Q8_0, n, k, np.random.default_rng(7))
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(7))
    out = torch.empty(3, n)
    torch.ops.pagedllm_quant.matmul_q15(x, [torch.from_numpy(raw.reshape(n, -1))], [int(Q.Q8_0)], k, out,
                                        available_isas().index(isa))
    ref = x.double() @ _reference_weights(raw, Q.Q8_0, n, k).T
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", PACKED_TYPES, ids=lambda q: q.name)
def test_dequantize_matches_gguf(qtype, isa):
    n, k = 5, 512
    raw = random_blocks(qtype, n, k, np.random.default_rng(3))
    ops = torch.ops.pagedllm_quant
    ours = ops.dequantize(torch.from_numpy(raw.reshape(n, -1)), int(qtype), k, torch.float32, available_isas().index(isa))
    torch.testing.assert_close(ours.double(), _reference_weights(raw, qtype, n, k), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qtype", PACKED_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantised_gemm_matches_reference(qtype, dtype):
    n, k, m = 70, 256, 33
    raw = random_blocks(qtype, n, k, np.random.default_rng(4))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(5))
    out = torch.empty(m, n, dtype=dtype)
    torch.ops.pagedllm_quant.matmul_dequant(x.to(dtype), [torch.from_numpy(raw.reshape(n, -1))], [int(qtype)], k, out, 16,
                                            len(available_isas()) - 1)
    ref = x.double() @ _reference_weights(raw, qtype, n, k).T
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_wrong_row_size_is_refused():
    w = torch.zeros(4, 19, dtype=torch.uint8)  # a Q4_0 row of 32 values is 18 bytes
    with pytest.raises(RuntimeError, match="do not hold"):
        torch.ops.pagedllm_quant.matmul_q8(torch.zeros(1, 48, dtype=torch.uint8), [w], [int(Q.Q4_0)], 32,
                                           torch.empty(1, 4), 0)


@pytest.mark.parametrize("isa", ISAS)
def test_parts_of_different_types_stack_their_rows(isa):
    """A fused q/k/v whose shards differ in type (as in Q4_K_M files) runs as one product."""
    k, types, rows = 256, [Q.Q4_K, Q.Q6_K, Q.Q8_0], [8, 3, 5]
    raws = [random_blocks(t, n, k, np.random.default_rng(i)) for i, (t, n) in enumerate(zip(types, rows))]
    ws = [torch.from_numpy(r.reshape(n, -1)) for r, n in zip(raws, rows)]
    ref_w = torch.cat([_reference_weights(r, t, n, k) for r, t, n in zip(raws, types, rows)])
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(0))
    ops, isa_id = torch.ops.pagedllm_quant, available_isas().index(isa)
    out = torch.empty(3, sum(rows))
    ops.matmul_q8(ops.quantize_q8(x, isa_id), ws, [int(t) for t in types], k, out, isa_id)
    ref = _q8_roundtrip(x) @ ref_w.T
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())
    out = torch.empty(3, sum(rows))
    ops.matmul_dequant(x, ws, [int(t) for t in types], k, out, 4, isa_id)
    torch.testing.assert_close(out.double(), x.double() @ ref_w.T, rtol=1e-5, atol=1e-5)


def _identity_q8_0(k: int) -> torch.Tensor:
    """A Q8_0 [k, k] identity (scale 1, one 1 per row): its product returns each activation as quantised."""
    blocks = np.zeros((k, k // 32, 34), dtype=np.uint8)
    blocks[:, :, :2] = np.frombuffer(np.float16(1).tobytes(), dtype=np.uint8)
    rows = np.arange(k)
    blocks[rows, rows // 32, 2 + rows % 32] = 1
    return torch.from_numpy(blocks.reshape(k, -1))


@pytest.mark.skipif(len(ISAS) < 2, reason="one instruction set only")
def test_every_instruction_set_quantises_activations_alike():
    """The vector quantisers round as the portable one does, so a model's results do not depend on the CPU.
    Each path lays its blocks out its own way, so the values are read back through an identity product."""
    k = 7 * 32  # a last group of three blocks on the AVX-512 path
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(3)) * 4
    x[1, :32] = 0  # a zero block
    x[2, 32:64] = torch.arange(32) - 15.5  # evenly spaced: many products near .5
    ops, identity = torch.ops.pagedllm_quant, _identity_q8_0(k)

    def values(isa_id: int) -> torch.Tensor:
        out = torch.empty(5, k)
        ops.matmul_q8(ops.quantize_q8(x, isa_id), [identity], [int(Q.Q8_0)], k, out, isa_id)
        return out

    # One rounding step apart would differ by `step`; the products' float noise stays far below it.
    step = (x.reshape(5, -1, 32).abs().amax(-1, keepdim=True) / 127).expand(-1, -1, 32).reshape(5, k)
    portable = values(0)
    assert ((portable - _q8_roundtrip(x).float()).abs() <= 0.1 * step).all()
    for isa_id in range(1, len(ISAS)):
        assert ((values(isa_id) - portable).abs() <= 0.1 * step).all(), ISAS[isa_id]


@pytest.mark.parametrize("isa", ISAS)
def test_silu_and_mul_in_bfloat16_rounds_once(isa):
    """The prefill MLP's activation: float32 math on bfloat16 inputs, one rounding (≤ 1 ulp of bf16)."""
    gate_up = (torch.randn(5, 2 * 203, generator=torch.Generator().manual_seed(5)) * 4).bfloat16()  # odd n: a tail
    gate_up[0, :4] = torch.tensor([-200.0, -90.0, 90.0, 200.0])  # e^-g past float32's range either way
    out = torch.ops.pagedllm_quant.silu_and_mul(gate_up, available_isas().index(isa))
    gate, up = gate_up.float().chunk(2, dim=-1)
    exact = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(out.float(), exact, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows,cols", [(5, 5), (7, 43), (16, 200)])
def test_causal_softmax_matches_masked_softmax(isa, rows, cols):
    """The prefill attention's softmax: queries at the last `rows` of `cols` positions see the keys up to
    their own; float32 math, one rounding to bfloat16, 0 past the visible keys."""
    scores = (torch.randn(3, rows, cols, generator=torch.Generator().manual_seed(rows)) * 6).bfloat16()
    visible = torch.arange(cols)[None, :] <= torch.arange(cols - rows, cols)[:, None]
    exact = scores.float().masked_fill(~visible, float("-inf")).softmax(-1)
    ours = scores.clone()
    torch.ops.pagedllm_quant.causal_softmax_(ours, available_isas().index(isa))
    torch.testing.assert_close(ours.float(), exact, rtol=2**-8, atol=1e-6)
    assert (ours[:, ~visible] == 0).all()


def _against_a_guard_page(raw: np.ndarray) -> tuple[torch.Tensor, mmap.mmap]:
    """raw's bytes ending exactly where a no-access page begins: a kernel that reads past them faults."""
    pages = -(-raw.nbytes // mmap.PAGESIZE) + 1
    buf = mmap.mmap(-1, pages * mmap.PAGESIZE)
    libc = ctypes.CDLL(None, use_errno=True)
    guard = ctypes.addressof(ctypes.c_char.from_buffer(buf)) + (pages - 1) * mmap.PAGESIZE
    assert libc.mprotect(ctypes.c_void_p(guard), mmap.PAGESIZE, 0) == 0
    view = np.frombuffer(buf, dtype=np.uint8, count=raw.nbytes, offset=(pages - 1) * mmap.PAGESIZE - raw.nbytes)
    view[:] = raw
    return torch.from_numpy(view), buf


@pytest.mark.parametrize("qtype", PACKED_TYPES, ids=lambda q: q.name)
def test_no_kernel_reads_past_the_last_block(qtype):
    """A packed tensor can end where a mapping ends (the last tensor of a GGUF file): products, 15-bit
    products and dequantisation read nothing after its last block, on every path, with a partial last
    group of blocks (three 32-weight blocks) too."""
    block = GGML_QUANT_SIZES[qtype][0]
    n, k = 5, 3 * block if block == 32 else 256
    data, buf = _against_a_guard_page(random_blocks(qtype, n, k, np.random.default_rng(0)))
    w, ops = data.reshape(n, -1), torch.ops.pagedllm_quant
    for isa_id in range(len(ISAS)):
        for m in (1, 5):
            x, out = torch.randn(m, k), torch.empty(m, n)
            ops.matmul_q8(ops.quantize_q8(x, isa_id), [w], [int(qtype)], k, out, isa_id)
            ops.matmul_q15(x, [w], [int(qtype)], k, out, isa_id)
        ops.dequantize(w, int(qtype), k, torch.float32, isa_id)
    del data, w
