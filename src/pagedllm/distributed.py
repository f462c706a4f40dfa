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


@dataclass(frozen=True)
class RankRows:
    """Where this rank's part of a split dimension lies in the checkpoint tensor's whole `size`: one range
    (a span of heads or of a width), or several, in order (each third of LFM2's B|C|x projection; value
    heads tiled over their key heads, as llama.cpp's Qwen3.5 files order them)."""

    size: int
    ranges: tuple[tuple[int, int], ...]  # (start, length)

    @classmethod
    def span(cls, first: int, count: int, size: int) -> "RankRows":
        return cls(size, ((first, count),))

    @property
    def count(self) -> int:
        return sum(length for _, length in self.ranges)

    def scaled(self, factor: int) -> "RankRows":
        """The same units, each `factor` rows (heads → their rows)."""
        return RankRows(self.size * factor, tuple((start * factor, length * factor) for start, length in self.ranges))

    @classmethod
    def concat(cls, *parts: "RankRows") -> "RankRows":
        """The parts of one tensor laid end to end (q | k | v of a fused projection), each split as given."""
        ranges, size = [], 0
        for part in parts:
            ranges += [(size + start, length) for start, length in part.ranges]
            size += part.size
        return cls(size, tuple(ranges))

    def take(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        parts = [tensor.narrow(dim, start, length) for start, length in self.ranges]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


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


def delta_net_heads(key_heads: int, value_heads: int, tiled: bool,
                    tp: TensorParallel | None) -> tuple[RankRows, RankRows]:
    """This rank's Gated DeltaNet key heads and the value heads that read them (in heads): whole key heads
    a rank, each with its value heads — h // repeat reads key head h where they are grouped (Hugging Face
    checkpoints: one span), h mod key heads where tiled (llama.cpp's Qwen3.5 files: a span in each tile)."""
    if tp is not None and tp.size > key_heads:
        raise ConfigError(f"{key_heads} linear-attention key heads cannot be split over {tp.size} ranks "
                          "(--tensor-parallel-size)")
    first, count = span(key_heads, tp)
    repeat = value_heads // key_heads
    if tiled:
        values = RankRows(value_heads, tuple((tile * key_heads + first, count) for tile in range(repeat)))
    else:
        values = RankRows.span(first * repeat, count * repeat, value_heads)
    return RankRows.span(first, count, key_heads), values


def check_split(heads: int, kv_heads: int, size: int, linear_key_heads: int = 0) -> None:
    """Refuse, before any process starts, a model whose heads cannot be split over `size` ranks
    (`linear_key_heads`: a hybrid's Gated DeltaNet heads, split whole)."""
    max_kv_heads(heads, kv_heads, size)
    if linear_key_heads:
        delta_net_heads(linear_key_heads, linear_key_heads, False, TensorParallel(0, size))


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
