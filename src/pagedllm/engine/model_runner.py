"""ModelRunner: owns the model and the KV tensors; turns a step's scheduled sequences into one forward pass
and its per-sequence results (engine/runner_output.py)."""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import mmap
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import ModelConfig
from ..attention import (AttentionMetadata, StepLayout, TorchBackend, kv_bytes_per_token, kv_row_elements,
                         select_backend)
from ..attention.metadata import long_tensor
from ..layers.recurrent_state import StateMetadata
from ..lora.layers import lora_segments
from ..models.transformer import Transformer
from ..sampling.sampler import Sampler, SamplingMetadata
from .cuda_graphs import DecodeGraphs, GraphConfig
from .runner_output import (GrammarMask, ModelRunnerOutput, record_hidden, record_prompt_logprobs, record_sampled,
                            record_search_rows, sampling_rows)
from .scheduler import ScheduledSequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVCacheSpec:
    """What was planned at start-up from the memory budget (a fact, not a setting): the KV blocks of the
    attention layers and, for hybrid models, the slots of the recurrent layers' per-sequence states."""

    num_blocks: int
    block_size: int
    bytes_per_block: int
    num_state_slots: int = 0  # one a running sequence
    state_bytes_per_slot: int = 0
    num_snapshot_slots: int = 0  # saved states, the hybrid's prefix cache (after the running ones)
    num_checkpoint_slots: int = 0  # speculative decoding: each running slot's state before its drafts (after those)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


def plan_kv_cache(config: ModelConfig, block_size: int, memory_bytes: int, dtype: torch.dtype,
                  kv_heads: int | None = None, state_slots: int = 0, snapshot_slots: int = 0,
                  checkpoints: bool = False, state_bytes: int | None = None) -> KVCacheSpec:
    """`dtype`: the pool's elements (KV_Q8_0 for 8-bit rows); `kv_heads`: per pool (see kv_bytes_per_token);
    `state_slots`: sequences whose recurrent states (hybrid models, float32) come out of the budget first,
    `snapshot_slots` saved states beside them, and with `checkpoints` a second slot a sequence (speculative
    decoding's rollback); `state_bytes`: a slot's, per pool (default: the whole model's, one process)."""
    per_block = kv_bytes_per_token(config, dtype, kv_heads) * block_size
    state_bytes = config.state_bytes_per_sequence if state_bytes is None else state_bytes
    slots, snapshots = (state_slots, snapshot_slots) if state_bytes else (0, 0)
    copies = slots if checkpoints else 0
    left = max(0, memory_bytes - (slots + snapshots + copies) * state_bytes)
    return KVCacheSpec(left // per_block, block_size, per_block, slots, state_bytes, snapshots, copies)


def _zeroed_pool(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 huge_pages: bool = True) -> torch.Tensor:
    """Zeroed, not empty: stale slots are read (then masked) and must not hold NaN. On the CPU, an
    anonymous mapping hands out zero pages lazily, so the pool costs nothing until it is used; it
    asks for huge pages because attention reads the pool with little locality (4 KiB pages made the
    decode kernel ~1.9x slower on an earlier host through TLB misses; ≤ 5% on Zen 4, docs/benchmarks.md).
    Not for recurrent states (`huge_pages` False): they are read a whole slot at a time (the delta rule ran
    as fast on 4 KiB pages), and the first touch of a huge page stalled up to 85 ms in the kernel's
    compaction (Qwen3.5-0.8B's first snapshot of a sequence; 6 ms on 4 KiB pages, measured on Zen 4)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    # Private: a shared anonymous mapping is shmem, which gets huge pages only where the host enables
    # them for shmem (often `never`, as here), whatever madvise asks.
    buffer = mmap.mmap(-1, max(1, math.prod(shape) * dtype.itemsize), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buffer, dtype=dtype).view(shape)  # the tensor keeps the mapping alive


@dataclass
class StepBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # flat-token rows whose logits are computed: the sampled ones, then prompt_rows
    num_sampled: int
    # Per scheduled sequence: (its first logits row, 1 + its drafts) when it samples this step, else None.
    sample_spans: list[tuple[int, int] | None]
    # Per scheduled sequence that asked for prompt logprobs: (its index, first prompt position, count).
    prompt_rows: list[tuple[int, int, int]]
    # Per scheduled sequence whose final hidden states are wanted (contrastive search): (its index,
    # first position, count); `hidden_rows` lists their flat-token rows in that order.
    hidden_spans: list[tuple[int, int, int]] = field(default_factory=list)
    hidden_rows: torch.Tensor | None = None
    padded: bool = False  # a decode step padded to a graph bucket (engine/cuda_graphs.py)
    lora_segments: list = field(default_factory=list)  # the step's rows by LoRA adapter (lora/layers.py)


@dataclass
class StepResult:
    logits: torch.Tensor  # float32, one row per logits_rows entry
    hidden: torch.Tensor | None  # final-norm hidden states at hidden_rows, when any were asked for


@functools.cache
def keep_freed_buffers() -> None:
    """Ask glibc's malloc to keep freed buffers of up to 32 MB for reuse instead of unmapping them.
    A prefill's activations (~10 MB each at 512 tokens) otherwise come back as fresh pages every
    step: 8k-44k page faults per SmolLM2 prefill, up to a third of its time (measured). Called once
    the model is loaded, so that the loader's freed temporaries still go back to the system."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: that allocator keeps its own policy
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    libc.mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's largest allowed value
    libc.mallopt(m_trim_threshold, 512 * 2**20)


class ModelRunner:
    def __init__(self, model: Transformer, spec: KVCacheSpec, device: torch.device, dtype: torch.dtype,
                 attention_backend: str = "auto", kv_dtype: torch.dtype | None = None,
                 graphs: GraphConfig | None = None):
        """`dtype`: the model's activations; `kv_dtype`: the pool's elements (default: the same);
        `graphs`: replay decode steps from graphs where the backend and the model allow it."""
        cfg = model.config
        self.model, self.spec, self.device = model, spec, device
        kv_dtype = kv_dtype or dtype
        self.attention_backend = select_backend(attention_backend, device, dtype, cfg.head_dim)
        if cfg.latent_attention and not self.attention_backend.supports_latent:
            log.warning("the %s attention backend does not read latent attention's pool: the torch backend attends",
                        self.attention_backend.name)
            self.attention_backend = TorchBackend()
        use_graphs = graphs is not None and self.attention_backend.supports_graphs and model.capturable
        blocks = spec.num_blocks + use_graphs  # the graphs' scratch block for padding rows
        attention = cfg.attention_layers
        shape = (len(attention), *self.attention_backend.kv_cache_shape(
            blocks, spec.block_size, model.attention_layers[0].self_attn.num_kv_heads,
            kv_row_elements(cfg.kv_row_dim, kv_dtype), cfg.kv_halves))
        self.kv_pool = _zeroed_pool(shape, kv_dtype, device)
        if torch.device(device).type == "cpu":
            keep_freed_buffers()
        # Each layer's cache: its slice of the KV pool, or a recurrent layer's states, each [slots, *shape].
        pools = iter(self.kv_pool.unbind(0))
        self.kv_caches = [next(pools) if i in attention else tuple(
            _zeroed_pool((spec.num_state_slots + spec.num_snapshot_slots + spec.num_checkpoint_slots, *shape),
                         torch.float32, device, huge_pages=False)
            for shape in cfg.state_shapes(i, model.tp))
            for i in range(cfg.num_hidden_layers)]
        self.state_caches = [state for i, cache in enumerate(self.kv_caches) if i not in attention for state in cache]
        self.sampler = Sampler()
        self.graphs = DecodeGraphs(graphs, self._forward, spec.num_blocks, spec.block_size,
                                   self.attention_backend.build_metadata, device) if use_graphs else None
        if self.graphs is not None and graphs.capture:
            self.graphs.capture_all()

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 output_rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, self.kv_caches, meta, output_rows=output_rows)

    def _decode_bucket(self, counts: np.ndarray) -> int | None:
        """The graph bucket of a step of single tokens, None for any other step."""
        if self.graphs is None or not (counts == 1).all():
            return None
        return self.graphs.config.bucket(len(counts))

    def prepare(self, scheduled: list[ScheduledSequence], block_tables: list[list[int]],
                state_slots: list[int] | None = None) -> StepBatch:
        """Flatten the step's tokens; sequences with nothing to sample still write their K/V.
        `state_slots`: each sequence's recurrent-state slot (hybrid models)."""
        bs = self.spec.block_size
        starts = np.asarray([s.sequence.num_computed_tokens for s in scheduled])
        counts = np.asarray([s.num_new_tokens for s in scheduled])
        ids = [t for s, st, n in zip(scheduled, starts, counts) for t in s.sequence.token_ids_at(int(st), int(n))]
        table = np.zeros((len(scheduled), max(len(t) for t in block_tables)), dtype=np.int64)
        for row, blocks in enumerate(block_tables):
            table[row, :len(blocks)] = blocks
        bucket = self._decode_bucket(counts)
        if bucket is not None:
            layout = self.graphs.pad(starts, table, bucket)
            ids += [0] * (bucket - len(ids))
        else:
            layout = StepLayout(starts, counts, table, bs, self.device)
        query_start, positions = layout.query_start, layout.positions
        meta = self.attention_backend.build_metadata(layout)
        if self.state_caches:
            meta.states = StateMetadata.build(starts, counts, np.asarray(state_slots), self.device)
        # A sequence with drafts is scored at the last real token and at every draft.
        sample_spans, sample_rows = [], []
        for i, s in enumerate(scheduled):
            count = 1 + s.num_spec_tokens if s.completes_prompt else 0
            sample_spans.append((len(sample_rows), count) if count else None)
            sample_rows += range(query_start[i + 1] - count, query_start[i + 1])
        prompt_rows, extra_rows = self._prompt_logprob_rows(scheduled, starts, counts, query_start)
        hidden_spans = [(i, int(starts[i]), int(counts[i])) for i, s in enumerate(scheduled)
                        if s.sequence.sampling_params.penalty_alpha > 0 or s.sequence.pools]
        hidden_rows = [row for i, _, n in hidden_spans for row in range(query_start[i], query_start[i] + n)]
        segments = (lora_segments([s.sequence.lora_id for s in scheduled], query_start, self.device)
                    if self.model.lora_context is not None else [])
        return StepBatch(self._long_tensor(ids), self._long_tensor(positions), meta,
                         self._long_tensor(sample_rows + extra_rows), len(sample_rows), sample_spans, prompt_rows,
                         hidden_spans, self._long_tensor(hidden_rows) if hidden_rows else None, bucket is not None,
                         segments)

    @staticmethod
    def _prompt_logprob_rows(scheduled: list[ScheduledSequence], starts: np.ndarray, counts: np.ndarray,
                             query_start: np.ndarray) -> tuple[list[tuple[int, int, int]], list[int]]:
        """Rows whose logits score the next prompt token, for sequences that asked for prompt logprobs."""
        spans, rows = [], []
        for i, s in enumerate(scheduled):
            prompt_len = len(s.sequence.prompt_token_ids)
            if s.sequence.sampling_params.prompt_logprobs is None or starts[i] >= prompt_len - 1:
                continue
            count = min(int(counts[i]), prompt_len - 1 - int(starts[i]))
            spans.append((i, int(starts[i]), count))
            rows += range(int(query_start[i]), int(query_start[i]) + count)
        return spans, rows

    def _long_tensor(self, values) -> torch.Tensor:
        return long_tensor(values, self.device)

    @torch.inference_mode()
    def execute(self, batch: StepBatch) -> StepResult:
        """Logits (float32) for `logits_rows` only: the lm_head is too costly for the rest."""
        # Only the logits rows' hidden states are wanted, unless some sequence keeps all of its own.
        only_logits = (not batch.padded and batch.hidden_rows is None
                       and 0 < len(batch.logits_rows) < len(batch.input_ids))
        run = self.graphs.run if batch.padded else functools.partial(
            self._forward, output_rows=batch.logits_rows if only_logits else None)
        context = self.model.lora_context
        if context is None:
            hidden = run(batch.input_ids, batch.positions, batch.meta)
        else:
            with context.applied(batch.lora_segments):  # probes and drafts between steps see the base model
                hidden = run(batch.input_ids, batch.positions, batch.meta)
        if only_logits:
            return StepResult(self.model.compute_logits(hidden), None)
        wanted = hidden[batch.hidden_rows] if batch.hidden_rows is not None else None
        return StepResult(self.model.compute_logits(hidden[batch.logits_rows]), wanted)

    def execute_model(self, scheduled: list[ScheduledSequence], block_tables: list[list[int]],
                      grammar_mask: GrammarMask, state_slots: list[int] | None = None) -> ModelRunnerOutput:
        """One step: the forward pass over everything scheduled, then what each sequence got from it."""
        batch = self.prepare(scheduled, block_tables, state_slots)
        return self.collect(scheduled, batch, self.execute(batch), grammar_mask)

    @torch.inference_mode()
    def collect(self, scheduled: list[ScheduledSequence], batch: StepBatch, result: StepResult,
                grammar_mask: GrammarMask) -> ModelRunnerOutput:
        """Sample every sampling row (a fan-out's one row once per sample, a row per draft) in one call,
        and hand out the logprobs and hidden states asked for, by sequence id."""
        out = ModelRunnerOutput()
        logits = result.logits
        owners, sources, states = sampling_rows(scheduled, batch.sample_spans, grammar_mask)
        if owners:
            rows = logits[torch.tensor(sources, device=logits.device)] if sources != list(range(len(logits))) else logits
            sampled = self.sampler(rows, SamplingMetadata.build(states, logits.shape[-1], self.device))
            record_sampled(out, scheduled, owners, sampled)
        record_prompt_logprobs(out, scheduled, batch.prompt_rows, logits[batch.num_sampled:])
        record_hidden(out, scheduled, batch.hidden_spans, result.hidden)
        record_search_rows(out, scheduled, batch.sample_spans, logits)
        return out

    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks (every layer, K and V): copy-on-write of blocks shared by forks."""
        if copies:
            source, destination = (self._long_tensor(c) for c in zip(*copies))
            self.kv_pool[:, :, destination] = self.kv_pool[:, :, source]

    @torch.inference_mode()
    def copy_states(self, copies: list[tuple[int, int]]) -> None:
        """Copy recurrent-state slots (every recurrent layer), in order — a snapshot saved this step may be
        the one a new sequence resumes from: a fork continues from its parent's state, a snapshot from
        its sequence's, a prefix hit from a snapshot."""
        for source, destination in copies:
            for states in self.state_caches:
                states[destination].copy_(states[source])
