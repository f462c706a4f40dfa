"""The Triton backend: one kernel launch per layer for all of a step's tokens, decodes and prefill
chunks alike (attention/triton_kernels.py), reading the paged pool in place.

It runs where Triton does: on a CUDA device, or anywhere under TRITON_INTERPRET=1 (the CPU tests).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .backend import AttentionBackend
from .kv_cache import KV_Q8_0
from .metadata import AttentionMetadata, StepLayout

BLOCK_N = 16  # keys scored per loop step
NO_WINDOW = 1 << 30  # a window no context reaches


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


class TritonBackend(AttentionBackend):
    name = "triton"
    supports_graphs = True

    @classmethod
    def usable(cls, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
        on_gpu = torch.device(device).type == "cuda"
        return triton_available() and (on_gpu or os.environ.get("TRITON_INTERPRET") == "1")

    def build_metadata(self, layout: StepLayout) -> AttentionMetadata:
        meta = super().build_metadata(layout)
        meta.cache["triton"] = (layout.tensor(layout.token_seq), layout.tensor(layout.positions),
                                layout.tensor(layout.table))
        return meta

    def graph_inputs(self, meta: AttentionMetadata) -> list[torch.Tensor]:
        return [meta.slot_mapping, *meta.cache["triton"]]

    def attend(self, q, kv_cache, meta, layer, matmul_dtype=None):
        from .triton_kernels import paged_attention_kernel

        token_seq, positions, table = meta.cache["triton"]
        tokens, heads, head_dim = q.shape
        kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
        q = q.contiguous()
        out = torch.empty_like(q)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        group = heads // kv_heads
        alibi = layer.alibi if layer.alibi is not None else q.new_zeros(1, dtype=torch.float32)
        sinks = layer.sinks if layer.sinks is not None else q.new_zeros(1, dtype=torch.float32)
        paged_attention_kernel[(tokens, kv_heads)](
            out, q, k_cache, v_cache, table, token_seq, positions, alibi, sinks,
            layer.scale, layer.softcap or 0.0, layer.sliding_window or NO_WINDOW,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), table.stride(0),
            GROUP=group, HEAD_DIM=head_dim, BLOCK_H=max(1, triton_next_power_of_2(group)),
            BLOCK_D=triton_next_power_of_2(head_dim), BLOCK_SIZE=block_size, BLOCK_N=BLOCK_N,
            HAS_ALIBI=layer.alibi is not None, HAS_SOFTCAP=layer.softcap is not None, Q8=kv_cache.dtype == KV_Q8_0,
            HAS_SINKS=layer.sinks is not None)
        return out


def triton_next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()
