"""The CPU backend: the torch backend, with its groups sent to C++ kernels (pagedllm.kernels) that read
the K/V blocks in place through the block tables — no gather, no padding, no mask: decode groups (one
query per sequence) to the decode kernel, prefill chunks to the fused prefill kernel (flash-style
tiles and an online softmax; its products in bfloat16 where the layer's own GEMMs run in it). Packed
decoder layers go further and run a whole decode layer around the decode kernel in one C++ call
(models/fused_decode.py)."""

from __future__ import annotations

import torch

from .. import kernels
from .backend import TorchBackend
from .metadata import AttentionMetadata, StepLayout


class CpuBackend(TorchBackend):
    name = "cpu"

    @classmethod
    def usable(cls, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
        """float32 and bfloat16 models on the CPU (the kernels take float32 queries: a bfloat16 model's are
        widened, its outputs narrowed back), with a compiled head size, once the kernels build."""
        return (torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16)
                and head_dim in kernels.KERNEL_HEAD_DIMS and kernels.cpu_kernels_available())

    def build_metadata(self, layout: StepLayout) -> AttentionMetadata:
        meta = super().build_metadata(layout)
        prefill_kernel = kernels.quant_kernels_available()
        for group in meta.groups:
            group.use_decode_kernel = group.max_query_len == 1
            group.use_prefill_kernel = prefill_kernel and not group.use_decode_kernel
        return meta

    def attend_group(self, q, kv_cache, meta, group, index, layer, matmul_dtype):
        if layer.value_dim is not None:  # a latent pool (layers/mla.py): the C++ kernels read K/V halves
            return super().attend_group(q, kv_cache, meta, group, index, layer, matmul_dtype)
        if group.use_decode_kernel and not q.requires_grad:
            return kernels.paged_decode_attention(q.float(), kv_cache, group.block_tables, group.context_lens,
                                                  layer.scale, layer.sliding_window, layer.softcap, layer.alibi,
                                                  layer.bfloat16_products and kernels.decode_bfloat16_available(),
                                                  layer.sinks).to(q.dtype)
        if group.use_prefill_kernel and q.dtype in (torch.float32, torch.bfloat16) and not q.requires_grad:
            bfloat16 = layer.bfloat16_products and kernels.prefill_bfloat16_available()
            return kernels.paged_prefill_attention(q.float(), kv_cache, group.block_tables, group.query_start,
                                                   group.context_lens, layer.scale, layer.sliding_window,
                                                   layer.softcap, layer.alibi, bfloat16, sinks=layer.sinks).to(q.dtype)
        return super().attend_group(q, kv_cache, meta, group, index, layer, matmul_dtype)
