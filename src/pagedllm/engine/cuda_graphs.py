"""Decode steps replayed from CUDA graphs (vLLM's pattern): the forward pass of a batch of single-token
steps is captured once per batch-size bucket, and each later decode step of up to that many
sequences is padded to the bucket, its inputs copied into the captured tensors, and replayed — one
launch of the whole model instead of hundreds of kernel launches, whose host cost dominates a small
model's decode on a GPU.

Padding rows decode token 0 at position 0 of a scratch block (one block past the pool's planned
ones, never handed out), so they write nothing a sequence reads. Block tables are padded to the
widest a sequence can have (max_model_len / block_size): the attention kernel walks only each
sequence's own context, so the width costs nothing.

Graphs need a backend whose step data is a fixed set of tensors (AttentionBackend.graph_inputs)
and a model without host decisions per step (routed experts sort tokens on the host): elsewhere
steps run eagerly. Without CUDA (the CPU tests) the same padded, static-buffer path runs eagerly,
so padding and the scratch block are checked there; capture and replay themselves need a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..attention import AttentionMetadata, StepLayout


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes captured: 1, 2, 4, then every multiple of 8 up to max_batch (vLLM's ladder)."""
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch + 8, 8))
    return tuple(s for s in sizes if s < max_batch) + (max_batch,)


@dataclass(frozen=True)
class GraphConfig:
    """batch_sizes: the buckets (sorted); max_blocks: the widest block table; capture: record CUDA
    graphs (False: run the padded step eagerly, as on the CPU)."""

    batch_sizes: tuple[int, ...]
    max_blocks: int
    capture: bool = True

    @classmethod
    def for_engine(cls, max_num_seqs: int, max_model_len: int, block_size: int, capture: bool) -> "GraphConfig":
        return cls(batch_buckets(max_num_seqs), math.ceil(max_model_len / block_size), capture)

    def bucket(self, num_seqs: int) -> int | None:
        return next((size for size in self.batch_sizes if size >= num_seqs), None)


@dataclass
class _Captured:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    hidden: torch.Tensor | None = None
    graph: "torch.cuda.CUDAGraph | None" = None


Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


class DecodeGraphs:
    """One captured (or, without CUDA, eagerly run) decode step per bucket, over static tensors."""

    def __init__(self, config: GraphConfig, forward: Forward, scratch_block: int, block_size: int,
                 build_metadata: Callable[[StepLayout], AttentionMetadata], device: torch.device | str):
        self.config, self.forward, self.scratch_block, self.block_size = config, forward, scratch_block, block_size
        self.build_metadata, self.device = build_metadata, device
        self.captured: dict[int, _Captured] = {}

    def pad(self, starts: np.ndarray, table: np.ndarray, bucket: int) -> StepLayout:
        """A decode step of len(starts) sequences as `bucket` rows: padding rows on the scratch block."""
        n = len(starts)
        padded_table = np.full((bucket, self.config.max_blocks), self.scratch_block, dtype=np.int64)
        padded_table[:n, :table.shape[1]] = table
        padded_starts = np.zeros(bucket, dtype=np.int64)
        padded_starts[:n] = starts
        return StepLayout(padded_starts, np.ones(bucket, dtype=np.int64), padded_table, self.block_size, self.device)

    def capture_all(self) -> None:
        """Every bucket, largest first so that the smaller graphs reuse its memory pool."""
        pool = torch.cuda.graph_pool_handle() if self.config.capture else None
        for bucket in sorted(self.config.batch_sizes, reverse=True):
            self._capture(bucket, pool)

    def _capture(self, bucket: int, pool) -> None:
        layout = self.pad(np.zeros(0, dtype=np.int64), np.zeros((0, 1), dtype=np.int64), bucket)
        static = _Captured(torch.zeros(bucket, dtype=torch.long, device=self.device),
                           layout.tensor(layout.positions), self.build_metadata(layout))
        if self.config.capture:
            self.forward(static.input_ids, static.positions, static.meta)  # compiles Triton kernels, sizes workspaces
            torch.cuda.synchronize()
            static.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(static.graph, pool=pool):
                static.hidden = self.forward(static.input_ids, static.positions, static.meta)
        self.captured[bucket] = static

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [bucket, hidden] of a padded decode step (inputs already padded to a bucket)."""
        bucket = input_ids.shape[0]
        if bucket not in self.captured:
            self._capture(bucket, None)
        static = self.captured[bucket]
        static.input_ids.copy_(input_ids, non_blocking=True)
        static.positions.copy_(positions, non_blocking=True)
        for target, source in zip(meta.backend.graph_inputs(static.meta), meta.backend.graph_inputs(meta)):
            target.copy_(source, non_blocking=True)
        if static.graph is None:
            return self.forward(static.input_ids, static.positions, static.meta)
        static.graph.replay()
        return static.hidden
