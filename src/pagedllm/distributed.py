"""Tensor parallelism: one model split over N processes (torch.distributed; NCCL on GPUs, gloo on
the CPU), each holding 1/N of every attention and MLP layer and of the vocabulary.

Column-parallel layers (q/k/v, gate/up, the vocabulary) keep a slice of their output rows; row-parallel
layers (o, down) a slice of their input columns, and their partial products are summed over the
group (all-reduce). Each rank takes its slice of a checkpoint tensor as it is loaded, through the
layers' per-parameter loading (layers/linear.py), so no rank ever holds the whole model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the group: rank `rank` of `size`."""

    rank: int
    size: int

    def part(self, parts: int) -> int:
        """Which of `parts` equal slices this rank holds: its own where there are `size`, a shared one
        where there are fewer (key/value heads replicated over ranks)."""
        return self.rank * parts // self.size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=dim)


def span(units: int, tp: TensorParallel | None) -> tuple[int, int]:
    """(first, count) of the `units` (heads, rows) this rank holds: contiguous, as even as they go
    (9 heads over 2 ranks: 5 and 4), or one shared unit where there are fewer units than ranks."""
    if tp is None or tp.size == 1:
        return 0, units
    if units < tp.size:
        return tp.part(units), 1
    first, last = tp.rank * units // tp.size, (tp.rank + 1) * units // tp.size
    return first, last - first


def attention_heads(heads: int, kv_heads: int, tp: TensorParallel | None) -> tuple[int, int, int, int]:
    """(first query head, query heads, first key/value head, key/value heads) of this rank. Whole
    key/value groups go together; with fewer key/value heads than ranks, each is shared."""
    group = heads // kv_heads
    if tp is None or tp.size == 1:
        return 0, heads, 0, kv_heads
    if kv_heads >= tp.size:
        kv_first, kv_count = span(kv_heads, tp)
        return kv_first * group, kv_count * group, kv_first, kv_count
    if tp.size % kv_heads or heads % tp.size:
        raise ConfigError(f"{heads} attention heads over {kv_heads} key/value heads cannot be split over "
                          f"{tp.size} ranks (--tensor-parallel-size)")
    q_first, q_count = span(heads, tp)
    return q_first, q_count, q_first // group, 1


def check_split(heads: int, kv_heads: int, size: int) -> None:
    """Refuse, before any process starts, a model whose heads cannot be split over `size` ranks."""
    max_kv_heads(heads, kv_heads, size)


def max_kv_heads(heads: int, kv_heads: int, size: int) -> int:
    """The most key/value heads any rank holds: what every rank's pool plans for (same block count)."""
    return max(attention_heads(heads, kv_heads, TensorParallel(r, size))[3] for r in range(size))


def init_group(rank: int, size: int, port: int, device: str) -> TensorParallel:
    """Join the group at 127.0.0.1:`port` (gloo on the CPU, NCCL on CUDA)."""
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "gloo":  # the ranks of one machine talk over loopback, not the host's network address
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    return TensorParallel(rank, size)
