"""The Triton paged-attention kernel, run by Triton's interpreter on the CPU (compiled where a GPU
is present), against the torch backend on random block tables: decodes and prefill chunks in one
step, grouped-query heads, sliding windows, soft-capping, ALiBi, fp16/bf16 and q8_0 pools."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported

from pagedllm.attention import KV_Q8_0, LayerAttention, StepLayout, TorchBackend, TritonBackend, alibi_slopes
from pagedllm.attention.kv_cache import quantize_q8_0
from pagedllm.attention.triton import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed (make test installs it)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _step(gen: np.random.Generator, block_size: int, num_blocks: int) -> StepLayout:
    """Three decodes and two prefill chunks (one from position 0, one after a cached prefix)."""
    starts = np.array([5, 17, 0, 0, 9])
    counts = np.array([1, 1, 1, 7, 6])
    blocks_needed = -(-(starts + counts) // block_size)
    table = np.zeros((len(starts), int(blocks_needed.max())), dtype=np.int64)
    free = gen.permutation(num_blocks)
    used = 0
    for row, n in enumerate(blocks_needed):
        table[row, :n] = free[used:used + n]
        used += n
    return StepLayout(starts, counts, table, block_size, DEVICE)


# q8_0 rows need head sizes of a multiple of 32 (the engine's rule for every backend): 80 runs in 16 bits only.
SHAPES_AND_POOLS = [(shape, kv_dtype) for shape in [(4, 4, 64), (6, 2, 32), (8, 1, 80)]
                    for kv_dtype in (torch.float16, torch.bfloat16, KV_Q8_0) if kv_dtype != KV_Q8_0 or shape[2] % 32 == 0]


@pytest.mark.parametrize("shape,kv_dtype", SHAPES_AND_POOLS)
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("extra", ["none", "softcap", "alibi", "sinks"])
def test_triton_equals_torch_backend(shape, kv_dtype, window, extra):
    heads, kv_heads, head_dim = shape
    gen = np.random.default_rng(heads * 100 + head_dim)
    torch.manual_seed(heads + head_dim)
    block_size, num_blocks = 4, 24
    layout = _step(gen, block_size, num_blocks)
    tokens = int(layout.counts.sum())
    row = head_dim // 32 * 34 if kv_dtype == KV_Q8_0 else head_dim
    pool = torch.randn(2, num_blocks, block_size, kv_heads, head_dim)
    pool = quantize_q8_0(pool) if kv_dtype == KV_Q8_0 else pool.to(kv_dtype)
    assert pool.shape[-1] == row
    q = torch.randn(tokens, heads, head_dim) * 2
    k, v = torch.randn(tokens, kv_heads, head_dim), torch.randn(tokens, kv_heads, head_dim)
    layer = LayerAttention(head_dim**-0.5, window, 3.0 if extra == "softcap" else None,
                           alibi_slopes(heads).to(DEVICE) if extra == "alibi" else None,
                           sinks=torch.randn(heads, device=DEVICE) * 2 if extra == "sinks" else None)
    outs = []
    for backend in (TorchBackend(), TritonBackend()):
        cache = pool.clone().to(DEVICE)
        meta = backend.build_metadata(layout)
        outs.append(backend.forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), cache, meta, layer).float().cpu())
    torch.testing.assert_close(outs[1], outs[0], atol=2e-4, rtol=2e-4)


def test_triton_backend_runs_a_model(tiny_models):
    """A whole model on the Triton backend: the same greedy tokens as the torch backend."""
    from pagedllm import LLM, SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(30 + i, 40 + 3 * i))} for i in range(3)]
    outs = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(tiny_models["gemma2"].hf_dir), kv_cache_memory=4 * 2**20, block_size=4,
                  attention_backend=backend, device=DEVICE)
        outs[backend] = [o.token_ids for o in llm.generate(prompts, params)]
    assert outs["triton"] == outs["torch"]
