"""The CPU backend: the torch backend, with decode groups (one query per sequence) sent to the C++
kernel (pagedllm.kernels), which reads the K/V blocks in place through the block tables — same
result, no gather, no padding, no mask. Packed decoder layers go further and run the whole layer
around that kernel in one C++ call (models/fused_decode.py)."""

from __future__ import annotations

import torch

from ..kernels import KERNEL_HEAD_DIMS, cpu_kernels_available, paged_decode_attention
from .backend import TorchBackend
from .metadata import AttentionMetadata, StepLayout


class CpuBackend(TorchBackend):
    name = "cpu"

    @classmethod
    def usable(cls, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
        """float32 models on the CPU, with a compiled head size, once the kernels build."""
        return (torch.device(device).type == "cpu" and dtype == torch.float32 and head_dim in KERNEL_HEAD_DIMS
                and cpu_kernels_available())

    def build_metadata(self, layout: StepLayout) -> AttentionMetadata:
        meta = super().build_metadata(layout)
        for group in meta.groups:
            group.use_decode_kernel = group.max_query_len == 1
        return meta

    def attend_group(self, q, kv_cache, meta, group, index, layer, matmul_dtype):
        if group.use_decode_kernel:
            return paged_decode_attention(q, kv_cache, group.block_tables, group.context_lens, layer.scale,
                                          layer.sliding_window, layer.softcap, layer.alibi)
        return super().attend_group(q, kv_cache, meta, group, index, layer, matmul_dtype)
