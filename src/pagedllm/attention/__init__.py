"""Attention backends behind one interface, chosen by name (`--attention-backend`):

- `torch`: plain torch ops, any device;
- `cpu`: the torch backend with the C++ decode kernel for one-query-per-sequence groups;
- `triton`: Triton kernels for every step (CUDA; on the CPU only under TRITON_INTERPRET=1, for tests);
- `auto`: `triton` on a GPU where Triton is installed, `cpu` where it builds and applies (float32 on
  the CPU), else `torch`.

The model calls `attention(...)` for each layer; the backend that built the step's metadata runs it.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .backend import AttentionBackend, TorchBackend, alibi_slopes
from .cpu import CpuBackend
from .kv_cache import KV_Q8_0, Q8_0_VALUES, cached_values, kv_bytes_per_token, kv_row_elements
from .metadata import AttentionGroup, AttentionMetadata, LayerAttention, StepLayout
from .triton import TritonBackend

BACKENDS: dict[str, type[AttentionBackend]] = {"torch": TorchBackend, "cpu": CpuBackend, "triton": TritonBackend}
AUTO_ORDER = ("triton", "cpu", "torch")  # what "auto" tries, best first


def select_backend(name: str, device: torch.device | str, dtype: torch.dtype, head_dim: int) -> AttentionBackend:
    """The backend called `name` ("auto": the first of AUTO_ORDER that can run this model here; the
    Triton interpreter is for tests, never picked by auto on the CPU)."""
    device = torch.device(device)
    if name == "auto":
        name = next(n for n in AUTO_ORDER if BACKENDS[n].usable(device, dtype, head_dim)
                    and (n != "triton" or device.type == "cuda"))
    if name not in BACKENDS:
        raise ConfigError(f"attention backend {name!r} is unknown (known: auto, {', '.join(BACKENDS)})")
    if not BACKENDS[name].usable(device, dtype, head_dim):
        raise ConfigError(f"attention backend {name!r} cannot run a {dtype} model with head size {head_dim} "
                          f"on {device}")
    return BACKENDS[name]()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
              layer: LayerAttention, matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One layer's attention: the step's K/V written to their slots, q attended over each sequence's cache."""
    return meta.backend.forward(q, k, v, kv_cache, meta, layer, matmul_dtype)


__all__ = ["AttentionBackend", "AttentionGroup", "AttentionMetadata", "BACKENDS", "CpuBackend", "KV_Q8_0",
           "LayerAttention", "Q8_0_VALUES", "StepLayout", "TorchBackend", "TritonBackend", "alibi_slopes", "attention",
           "cached_values", "kv_bytes_per_token", "kv_row_elements", "select_backend"]
