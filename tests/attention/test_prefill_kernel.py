"""The fused prefill kernel (kernels/prefill_attention.cpp) against attention written out in float64:
every instruction-set path this CPU runs, float32 and (where the CPU has AVX-512 BF16) bfloat16
products, every KV-pool dtype, windows, soft-caps, ALiBi, GQA ratios, odd lengths, chunks against
a cached prefix, several sequences at once."""

from __future__ import annotations

import math

import pytest
import torch

from pagedllm import kernels
from pagedllm.attention.kv_cache import dequantize_q8_0, quantize_q8_0

pytestmark = pytest.mark.skipif(not kernels.quant_kernels_available(), reason="no C++ compiler for the CPU kernels")

POOL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, "q8_0"]


def products():
    """(instruction set, bfloat16 products) pairs this CPU runs."""
    if not kernels.quant_kernels_available():
        return []
    pairs = [(isa, False) for isa in kernels.available_isas()]
    return pairs + [(kernels.available_isas()[-1], True)] * kernels.prefill_bfloat16_available()


def paged_case(gen, counts, contexts, heads, kv_heads, dim, block_size, pool_dtype):
    """Sequences whose last counts[s] of contexts[s] tokens are new, their blocks scattered in one pool."""
    need = [math.ceil(c / block_size) for c in contexts]
    blocks = sum(need) + 2
    order = torch.randperm(blocks, generator=gen)
    tables = torch.zeros(len(contexts), max(need), dtype=torch.long)
    first = 0
    for s, n in enumerate(need):
        tables[s, :n] = order[first:first + n]
        first += n
    floats = torch.randn(2, blocks, block_size, kv_heads, dim, generator=gen)
    if pool_dtype == "q8_0":
        pool = quantize_q8_0(floats)
        floats = dequantize_q8_0(pool, torch.float32)
    else:
        pool = floats.to(pool_dtype)
        floats = pool.float()
    q = torch.randn(sum(counts), heads, dim, generator=gen)
    starts = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    return q, pool, floats, tables, starts, torch.tensor(contexts)


def reference(q, floats, tables, starts, contexts, scale, window=None, softcap=None, slopes=None, sinks=None):
    """Each sequence's queries against its gathered keys, scores written out in float64 (each head's sink
    logit one more softmax column, dropped after, where given)."""
    block_size, kv_heads, dim = floats.shape[2], floats.shape[3], floats.shape[4]
    group = q.shape[1] // kv_heads
    out = torch.empty_like(q)
    for s, context in enumerate(contexts.tolist()):
        slots = tables[s, torch.arange(context) // block_size] * block_size + torch.arange(context) % block_size
        keys, values = (floats[i].reshape(-1, kv_heads, dim)[slots].double().repeat_interleave(group, 1) for i in (0, 1))
        rows = slice(int(starts[s]), int(starts[s + 1]))
        scores = torch.einsum("thd,chd->htc", q[rows].double(), keys) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        query_pos = torch.arange(context - (rows.stop - rows.start), context)[:, None]
        key_pos = torch.arange(context)[None, :]
        if slopes is not None:
            scores = scores + slopes.double()[:, None, None] * (key_pos - query_pos)
        visible = key_pos <= query_pos
        if window:
            visible &= key_pos > query_pos - window
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            column = sinks.double()[:, None, None].expand(-1, scores.shape[1], 1)
            weights = torch.cat([scores, column], dim=-1).softmax(-1)[..., :-1]
        else:
            weights = scores.softmax(-1)
        out[rows] = torch.einsum("htc,chd->thd", weights, values).float()
    return out


def check(out, ref, bfloat16):
    if bfloat16:  # bfloat16 rounding of the queries, keys, weights and values
        torch.testing.assert_close(out, ref, rtol=0, atol=0.06)
        assert (out - ref).abs().mean() < 0.006
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("isa,bfloat16", products())
@pytest.mark.parametrize("pool_dtype", POOL_DTYPES)
@pytest.mark.parametrize("heads,kv_heads,dim", [(14, 2, 64), (9, 3, 64), (4, 4, 128), (6, 1, 96)])
def test_prefill_kernel_matches_reference(isa, bfloat16, pool_dtype, heads, kv_heads, dim):
    """Whole prompts, chunks against a cached prefix (at and off the 64-key tiles), one-token runs."""
    gen = torch.Generator().manual_seed(heads * dim)
    counts, contexts = [130, 37, 1, 64, 5], [130, 300, 71, 192, 5]
    q, pool, floats, tables, starts, lens = paged_case(gen, counts, contexts, heads, kv_heads, dim, 16, pool_dtype)
    out = kernels.paged_prefill_attention(q, pool, tables, starts, lens, dim**-0.5, None, bfloat16=bfloat16, isa=isa)
    check(out, reference(q, floats, tables, starts, lens, dim**-0.5), bfloat16)


@pytest.mark.parametrize("isa,bfloat16", products())
@pytest.mark.parametrize("window,softcap,alibi", [(7, None, False), (100, None, False), (None, 30.0, False),
                                                  (None, None, True), (40, 50.0, True)])
def test_prefill_kernel_windows_softcaps_alibi(isa, bfloat16, window, softcap, alibi):
    gen = torch.Generator().manual_seed(window or 1)
    heads, kv_heads, dim = 8, 2, 32
    counts, contexts = [90, 3, 200], [250, 70, 200]
    q, pool, floats, tables, starts, lens = paged_case(gen, counts, contexts, heads, kv_heads, dim, 8, torch.float16)
    slopes = torch.rand(heads, generator=gen) * 0.3 if alibi else None
    out = kernels.paged_prefill_attention(q, pool, tables, starts, lens, dim**-0.5, window, softcap, slopes,
                                          bfloat16=bfloat16, isa=isa)
    check(out, reference(q, floats, tables, starts, lens, dim**-0.5, window, softcap, slopes), bfloat16)


@pytest.mark.parametrize("isa,bfloat16", products())
@pytest.mark.parametrize("window", [None, 50])
def test_prefill_kernel_attention_sinks(isa, bfloat16, window):
    """gpt-oss's per-head sink logits in the denominator, over whole prompts and chunks after a prefix."""
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, dim = 8, 2, 64
    counts, contexts = [90, 3, 200], [250, 70, 200]
    q, pool, floats, tables, starts, lens = paged_case(gen, counts, contexts, heads, kv_heads, dim, 16, torch.bfloat16)
    sinks = torch.randn(heads, generator=gen) * 3
    out = kernels.paged_prefill_attention(q, pool, tables, starts, lens, dim**-0.5, window, bfloat16=bfloat16, isa=isa,
                                          sinks=sinks)
    check(out, reference(q, floats, tables, starts, lens, dim**-0.5, window, sinks=sinks), bfloat16)


@pytest.mark.parametrize("isa,bfloat16", products())
def test_prefill_kernel_every_compiled_head_dim(isa, bfloat16):
    for dim in kernels.KERNEL_HEAD_DIMS:
        gen = torch.Generator().manual_seed(dim)
        pool_dtype = "q8_0" if dim % 32 == 0 else torch.float32
        q, pool, floats, tables, starts, lens = paged_case(gen, [33], [97], 4, 2, dim, 16, pool_dtype)
        out = kernels.paged_prefill_attention(q, pool, tables, starts, lens, dim**-0.5, None, bfloat16=bfloat16,
                                              isa=isa)
        check(out, reference(q, floats, tables, starts, lens, dim**-0.5), bfloat16)


@pytest.mark.parametrize("bfloat16", [False, True][: 1 + kernels.prefill_bfloat16_available()])
def test_a_tokens_result_does_not_depend_on_chunks_or_batch(bfloat16):
    """Key tiles sit at fixed positions: a prompt in one chunk, in two, or batched with another sequence
    gives the same bits for each token."""
    gen = torch.Generator().manual_seed(5)
    q, pool, _, tables, _, _ = paged_case(gen, [300], [300], 6, 2, 64, 16, torch.float16)
    whole = kernels.paged_prefill_attention(q, pool, tables, torch.tensor([0, 300]), torch.tensor([300]), 0.125, None,
                                            bfloat16=bfloat16)
    chunks = [kernels.paged_prefill_attention(q[a:b], pool, tables, torch.tensor([0, b - a]), torch.tensor([b]), 0.125,
                                              None, bfloat16=bfloat16) for a, b in ((0, 100), (100, 300))]
    assert torch.equal(torch.cat(chunks), whole)
    other = torch.randn(40, 6, 64, generator=gen)
    batched = kernels.paged_prefill_attention(torch.cat([other, q[100:]]), pool, tables.repeat(2, 1),
                                              torch.tensor([0, 40, 240]), torch.tensor([40, 300]), 0.125, None,
                                              bfloat16=bfloat16)
    assert torch.equal(batched[40:], whole[100:])


def test_prefill_kernel_refuses_what_it_cannot_read():
    q, pool = torch.randn(4, 2, 24), torch.randn(2, 4, 4, 2, 24)
    args = (torch.zeros(1, 1, dtype=torch.long), torch.tensor([0, 4]), torch.tensor([4]), 1.0, None)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernels.paged_prefill_attention(q, pool, *args)
    q, pool = torch.randn(4, 2, 32), torch.randn(2, 4, 4, 2, 32)
    with pytest.raises(RuntimeError, match="block table"):  # 5 tokens in a one-block table of 4
        kernels.paged_prefill_attention(q, pool, torch.zeros(1, 1, dtype=torch.long), torch.tensor([0, 4]),
                                        torch.tensor([5]), 1.0, None)
