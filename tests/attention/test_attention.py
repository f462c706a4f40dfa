"""Paged attention: the C++ decode kernel against the plain-torch path, and the fallback without it."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from pagedllm import LLM, SamplingParams
from pagedllm import kernels
from pagedllm.kernels import KERNEL_HEAD_DIMS, cpu_kernels_available, paged_decode_attention
from pagedllm.attention import KV_Q8_0, alibi_slopes
from pagedllm.attention.backend import _causal_attention_chunked
from pagedllm.attention.kv_cache import dequantize_q8_0, quantize_q8_0
from helpers import FLOAT

needs_kernel = pytest.mark.skipif(not cpu_kernels_available(), reason="no C++ compiler to build the CPU kernels")


def reference_decode(q, kv_cache, tables, lens, scale, window):
    """SDPA over the gathered, padded context: the torch path's computation, written out."""
    block_size = kv_cache.shape[2]
    keys = kv_cache[0][tables].flatten(1, 2).transpose(1, 2)
    values = kv_cache[1][tables].flatten(1, 2).transpose(1, 2)
    pos = torch.arange(tables.shape[1] * block_size)
    mask = pos[None] < lens[:, None]
    if window:
        mask &= pos[None] >= lens[:, None] - window
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask[:, None, None], scale=scale,
                                         enable_gqa=True)
    return out[:, :, 0]


@needs_kernel
@pytest.mark.parametrize("head_dim", KERNEL_HEAD_DIMS)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_kernel_matches_torch(head_dim, heads, kv_heads, window, kv_dtype):
    gen = torch.Generator().manual_seed(head_dim * 100 + heads)
    seqs, block_size, num_blocks, max_blocks = 7, 4, 64, 9
    kv_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to(kv_dtype)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:max_blocks] for _ in range(seqs)])
    lens = torch.tensor([1, 2, 4, 5, 17, 30, 36])  # one token, block edges, a full table
    q = torch.randn(seqs, heads, head_dim, generator=gen)
    out = paged_decode_attention(q, kv_cache, tables, lens, head_dim**-0.5, window)
    torch.testing.assert_close(out, reference_decode(q, kv_cache.float(), tables, lens, head_dim**-0.5, window),
                               atol=1e-5, rtol=1e-5)


def reference_scores_decode(q, kv_cache, tables, lens, window, softcap=None, slopes=None, sinks=None):
    """Explicit scores (soft-capped, ALiBi-biased where asked), masked softmax (with each head's sink logit as
    one more column, dropped after, where given), weighted values."""
    heads, kv_heads, head_dim = q.shape[1], kv_cache.shape[3], q.shape[2]
    keys = kv_cache[0][tables].flatten(1, 2).repeat_interleave(heads // kv_heads, dim=2)  # [seqs, ctx, heads, dim]
    values = kv_cache[1][tables].flatten(1, 2).repeat_interleave(heads // kv_heads, dim=2)
    scores = torch.einsum("shd,sthd->sht", q, keys) * head_dim**-0.5
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    pos = torch.arange(keys.shape[1])
    if slopes is not None:
        scores = scores + slopes[None, :, None] * (pos[None, None, :] - (lens[:, None, None] - 1))
    visible = (pos[None] < lens[:, None]) & ((pos[None] >= lens[:, None] - window) if window else True)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    if sinks is not None:
        column = sinks[None, :, None].expand(len(scores), -1, 1)
        weights = torch.cat([scores, column], dim=-1).softmax(-1)[..., :-1]
    else:
        weights = scores.softmax(-1)
    return torch.einsum("sht,sthd->shd", weights, values)


@needs_kernel
@pytest.mark.parametrize("bfloat16", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_kernel_attention_sinks(bfloat16, threads):
    """gpt-oss's sinks: a per-head logit in each softmax's denominator, on one share and on shares merged
    after (2,500 keys), with and without a window; sinks large enough to take most of the weight."""
    if bfloat16 and not kernels.decode_bfloat16_available():
        pytest.skip("the decode kernel's bfloat16 products need AVX-512 BF16")
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(5)
        block_size, num_blocks, max_blocks, heads, kv_heads, head_dim = 16, 170, 160, 8, 2, 64
        kv_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen)
        tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:max_blocks] for _ in range(3)])
        lens = torch.tensor([2500, 20, 1])
        q = torch.randn(3, heads, head_dim, generator=gen) * 2
        sinks = torch.randn(heads, generator=gen) * 3
        for window in (None, 128):
            out = paged_decode_attention(q, kv_cache, tables, lens, head_dim**-0.5, window, bfloat16=bfloat16,
                                         sinks=sinks)
            ref = reference_scores_decode(q, kv_cache, tables, lens, window, sinks=sinks)
            if bfloat16:
                assert_within_bfloat16(out, ref)
            else:
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(saved)


@needs_kernel
@pytest.mark.parametrize("head_dim", [64, 256])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_kernel_softcap_and_alibi(head_dim, softcap, alibi, window):
    """Gemma 2's soft-capped scores and ALiBi's distance bias in the kernel, against explicit scores."""
    gen = torch.Generator().manual_seed(head_dim + 7)
    seqs, block_size, num_blocks, max_blocks, heads, kv_heads = 5, 4, 32, 6, 6, 2
    kv_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:max_blocks] for _ in range(seqs)])
    lens = torch.tensor([1, 3, 8, 13, 24])
    q = torch.randn(seqs, heads, head_dim, generator=gen) * 2
    slopes = alibi_slopes(heads) if alibi else None
    out = paged_decode_attention(q, kv_cache, tables, lens, head_dim**-0.5, window, softcap, slopes)
    torch.testing.assert_close(out, reference_scores_decode(q, kv_cache, tables, lens, window, softcap, slopes),
                               atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("seqs,heads,kv_heads", [(1, 9, 3), (1, 4, 1), (3, 6, 1)])
@pytest.mark.parametrize("window", [None, 70])
@pytest.mark.parametrize("mods", [False, True])
def test_decode_kernel_splits_few_long_sequences_over_the_threads(seqs, heads, kv_heads, window, mods):
    """Fewer (sequence, kv head) pairs than split evenly over the threads: each pair's keys are split
    into shares whose softmax partials are merged (contexts of 1 to 300 keys — one key leaves a share
    empty; with soft-capping and ALiBi, whose distances must stay each key's own)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(seqs * 10 + heads)
        block_size, num_blocks, max_blocks, head_dim = 16, 64, 19, 64
        kv_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen)
        tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:max_blocks] for _ in range(seqs)])
        lens = torch.tensor([300, 1, 129][:seqs]) if seqs > 1 else torch.tensor([300])  # 1 key: a share with none
        q = torch.randn(seqs, heads, head_dim, generator=gen) * 2
        softcap, slopes = (2.0, alibi_slopes(heads)) if mods else (None, None)
        out = paged_decode_attention(q, kv_cache, tables, lens, head_dim**-0.5, window, softcap, slopes)
        torch.testing.assert_close(out, reference_scores_decode(q, kv_cache, tables, lens, window, softcap, slopes),
                                   atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("window", [None, 1500])
def test_decode_kernel_splits_long_contexts_into_shares(window):
    """Past 1,024 keys every (sequence, kv head) pair is split into shares merged after, however many
    pairs there are: 2,500 and 1,030 keys (three shares and two, the last of 6), next to a short one."""
    gen = torch.Generator().manual_seed(11)
    block_size, num_blocks, max_blocks, heads, kv_heads, head_dim = 16, 170, 160, 8, 2, 64
    kv_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to(torch.float16)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:max_blocks] for _ in range(3)])
    lens = torch.tensor([2500, 1030, 40])
    q = torch.randn(3, heads, head_dim, generator=gen) * 2
    out = paged_decode_attention(q, kv_cache, tables, lens, head_dim**-0.5, window)
    torch.testing.assert_close(out, reference_scores_decode(q, kv_cache.float(), tables, lens, window),
                               atol=1e-5, rtol=1e-5)


@needs_kernel
def test_decode_kernel_merges_only_shares_that_hold_keys():
    """A one-key sequence next to long ones leaves one of its shares empty; its only logit far below 0
    (−200) must still weigh 1, not underflow against an empty share's unset peak."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(3)
        kv_cache = torch.randn(2, 64, 16, 1, 64, generator=gen)
        tables = torch.stack([torch.randperm(64, generator=gen)[:19] for _ in range(3)])
        lens = torch.tensor([300, 1, 129])
        q = torch.randn(3, 4, 64, generator=gen)
        key = kv_cache[0, tables[1, 0], 0, 0]
        q[1] = key * (-200 / (key @ key * 64**-0.5))  # every head's one logit: −200
        out = paged_decode_attention(q, kv_cache, tables, lens, 64**-0.5, None)
        torch.testing.assert_close(out[1], kv_cache[1, tables[1, 0], 0, 0].expand(4, 64), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, reference_scores_decode(q, kv_cache, tables, lens, None), atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("head_dim", [d for d in KERNEL_HEAD_DIMS if d % 32 == 0])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_kernel_reads_q8_0_rows(head_dim, window):
    """An 8-bit pool: the kernel's result is the torch path's over the same rows read back as floats."""
    gen = torch.Generator().manual_seed(head_dim)
    seqs, block_size, num_blocks, max_blocks, heads, kv_heads = 5, 4, 32, 6, 6, 2
    kv_cache = quantize_q8_0(torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen) * 3)
    assert kv_cache.dtype == KV_Q8_0 and kv_cache.shape[-1] == head_dim // 32 * 34
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:max_blocks] for _ in range(seqs)])
    lens = torch.tensor([1, 4, 9, 17, 24])
    q = torch.randn(seqs, heads, head_dim, generator=gen)
    out = paged_decode_attention(q, kv_cache, tables, lens, head_dim**-0.5, window)
    floats = dequantize_q8_0(kv_cache, torch.float32)
    torch.testing.assert_close(out, reference_decode(q, floats, tables, lens, head_dim**-0.5, window),
                               atol=1e-5, rtol=1e-5)


needs_bf16_decode = pytest.mark.skipif(not (cpu_kernels_available() and kernels.decode_bfloat16_available()),
                                       reason="the decode kernel's bfloat16 products need AVX-512 BF16")
POOL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, KV_Q8_0]


def pool_of(values: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A pool of `values` in `dtype`, and the float32 values it holds."""
    pool = quantize_q8_0(values) if dtype == KV_Q8_0 else values.to(dtype)
    return pool, dequantize_q8_0(pool, torch.float32) if dtype == KV_Q8_0 else pool.float()


def assert_within_bfloat16(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Products in bfloat16 (8-bit significands): each value within 3e-2 of the float32 result, 3e-3 on average."""
    torch.testing.assert_close(out, ref, rtol=0, atol=3e-2)
    assert (out - ref).abs().mean() < 3e-3


@needs_bf16_decode
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 256])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (14, 2), (8, 1)])
@pytest.mark.parametrize("kv_dtype", POOL_DTYPES)
def test_decode_kernel_bfloat16_products(head_dim, heads, kv_heads, kv_dtype):
    """The bfloat16 path (16 keys a tile transposed, values paired) against float32 attention over the
    same cached values: every pool dtype, GQA ratios, lengths around tiles (1, 15, 16, 17, 33, 100) and a window."""
    gen = torch.Generator().manual_seed(head_dim + heads + POOL_DTYPES.index(kv_dtype))
    seqs, block_size, num_blocks, max_blocks = 6, 4, 64, 26
    kv_cache, floats = pool_of(torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen), kv_dtype)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:max_blocks] for _ in range(seqs)])
    lens = torch.tensor([1, 15, 16, 17, 33, 100])
    q = torch.randn(seqs, heads, head_dim, generator=gen)
    for window in (None, 20):
        out = paged_decode_attention(q, kv_cache, tables, lens, head_dim**-0.5, window, bfloat16=True)
        assert_within_bfloat16(out, reference_decode(q, floats, tables, lens, head_dim**-0.5, window))


@needs_bf16_decode
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_kernel_bfloat16_mods_and_shares(softcap, alibi, threads):
    """Soft-capping and ALiBi (applied in natural units to base-2 scores), and long and few sequences
    split into shares merged after: 2,500 and 1,030 keys, one key, a window of 1,500."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(21)
        block_size, num_blocks, max_blocks, heads, kv_heads, head_dim = 16, 170, 160, 8, 2, 64
        kv_cache, floats = pool_of(torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen), torch.float16)
        tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:max_blocks] for _ in range(3)])
        lens = torch.tensor([2500, 1030, 1])
        q = torch.randn(3, heads, head_dim, generator=gen) * 2
        slopes = alibi_slopes(heads) if alibi else None
        for window in (None, 1500):
            out = paged_decode_attention(q, kv_cache, tables, lens, head_dim**-0.5, window, softcap, slopes, bfloat16=True)
            assert_within_bfloat16(out, reference_scores_decode(q, floats, tables, lens, window, softcap, slopes))
    finally:
        torch.set_num_threads(saved)


@needs_kernel
@pytest.mark.parametrize("head_dim", [16, 80])
def test_decode_kernel_keeps_float_products_where_bfloat16_has_no_body(head_dim):
    """Head sizes that are not whole 32-value runs take the float32 path even when bfloat16 is asked for."""
    gen = torch.Generator().manual_seed(head_dim)
    kv_cache = torch.randn(2, 16, 4, 2, head_dim, generator=gen).to(torch.float16)
    tables, lens = torch.randperm(16, generator=gen)[None], torch.tensor([37])
    q = torch.randn(1, 4, head_dim, generator=gen)
    asked = paged_decode_attention(q, kv_cache, tables, lens, head_dim**-0.5, None, bfloat16=True)
    assert torch.equal(asked, paged_decode_attention(q, kv_cache, tables, lens, head_dim**-0.5, None))


@pytest.mark.parametrize("length", [1, 127, 300])  # within one chunk, at its edge, three chunks with a remainder
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (14, 2)])
def test_chunked_causal_attention_matches_sdpa(length, heads, kv_heads):
    """The prefill path of bfloat16-GEMM layers: in float32 it is SDPA's causal attention; in
    bfloat16 it stays within bfloat16 rounding of it."""
    gen = torch.Generator().manual_seed(length + heads)
    q = torch.randn(2, heads, length, 64, generator=gen)
    k, v = (torch.randn(2, kv_heads, length, 64, generator=gen) for _ in range(2))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125, enable_gqa=True)
    torch.testing.assert_close(_causal_attention_chunked(q, k, v, 0.125, torch.float32), ref, rtol=1e-5, atol=1e-5)
    narrow = _causal_attention_chunked(q, k, v, 0.125, torch.bfloat16).float()
    torch.testing.assert_close(narrow, ref, rtol=0, atol=0.05)
    assert (narrow - ref).abs().mean() < 0.005


def test_q8_0_rows_hold_each_value_within_half_a_step():
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.05, 1.0, 50.0])[:, None, None]
    x[0, 0] = 0  # an all-zero block has scale 0
    back = dequantize_q8_0(quantize_q8_0(x), torch.float32)
    step = x.unflatten(-1, (-1, 32)).abs().amax(-1, keepdim=True) / 127
    # half a step, plus the float16 scale's rounding (2^-11 of it) times up to 127 steps
    assert ((back - x).unflatten(-1, (-1, 32)).abs() <= step * (0.5 + 127 * 2**-11) + 1e-12).all()
    assert (back[0, 0] == 0).all()


@needs_kernel
def test_kernel_refuses_an_uncompiled_head_dim():
    q, kv_cache = torch.randn(1, 2, 24), torch.randn(2, 4, 4, 2, 24)
    with pytest.raises(RuntimeError, match="head_dim 24"):
        paged_decode_attention(q, kv_cache, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long),
                               1.0, None)


PROMPTS = ["The history of Rome", "def add(a, b):", "Water boils at", "List three colours:"]


def test_backends_give_the_same_greedy_tokens():
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    outputs = {}
    for backend in ("auto", "torch"):
        llm = LLM(kv_cache_memory=32 * 2**20, max_num_batched_tokens=64, attention_backend=backend,
                  quantization=FLOAT)
        expected = "cpu" if backend == "auto" and cpu_kernels_available() else "torch"
        assert llm.engine.runner.attention_backend.name == expected
        outputs[backend] = [o.token_ids for o in llm.generate(PROMPTS, params)]
    assert outputs["auto"] == outputs["torch"]


def test_a_bfloat16_model_attends_with_the_kernels_too():
    """A --dtype bfloat16 model on the CPU: the C++ kernels (queries widened, outputs narrowed) give the torch
    backend's step within bfloat16's rounding, prompt and decode."""
    if not cpu_kernels_available():
        pytest.skip("the CPU kernels did not build")
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    logprobs = {}
    for backend in ("auto", "torch"):
        llm = LLM(kv_cache_memory=32 * 2**20, max_num_batched_tokens=64, attention_backend=backend,
                  quantization=FLOAT, dtype="bfloat16")
        assert llm.engine.runner.attention_backend.name == ("cpu" if backend == "auto" else "torch")
        out = llm.generate(PROMPTS[0], params)[0].outputs[0]
        logprobs[backend] = (out.token_ids, [next(iter(row.values())).logprob for row in out.logprobs])
    assert logprobs["auto"][0][:4] == logprobs["torch"][0][:4]
    assert logprobs["auto"][1][:4] == pytest.approx(logprobs["torch"][1][:4], abs=0.1)


def test_failed_build_falls_back_to_torch(monkeypatch, caplog):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    kernels.cpu_kernels_available.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="pagedllm.kernels"):
            assert not kernels.cpu_kernels_available()
        assert "no C++ compiler" in caplog.text
    finally:
        kernels.cpu_kernels_available.cache_clear()


def test_unknown_backend_is_a_config_error():
    from pagedllm.errors import ConfigError

    with pytest.raises(ConfigError, match="attention_backend"):
        LLM(attention_backend="flash")
