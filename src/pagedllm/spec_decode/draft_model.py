"""Draft-model speculation: a smaller model with the same vocabulary guesses the next tokens
greedily, with its own paged KV cache, batched over every sequence that wants drafts."""

from __future__ import annotations

import torch

from ..engine.kv_cache_manager import KVCacheManager
from ..engine.model_runner import ModelRunner, plan_kv_cache
from ..engine.sequence import Sequence
from ..engine.scheduler import ScheduledSequence
from ..errors import PagedLLMError
from ..models.loaders import ModelSource, load_model
from ..sampling_params import SamplingParams


class DraftModelProposer:
    """Each target sequence has a *mirror* here: the same tokens, and how many of them the draft's
    cache holds. A call brings every mirror up to date in one forward pass (only the tokens the
    target accepted since last time, plus the new one), then runs num_tokens - 1 one-token passes.
    Mirrors of sequences that stop asking are freed."""

    def __init__(self, source: ModelSource, num_tokens: int, vocab_size: int, device: torch.device,
                 dtype: torch.dtype, kv_cache_memory_bytes: int, block_size: int, attention_backend: str = "auto"):
        self.model = load_model(source, device, dtype)
        if self.model.config.vocab_size != vocab_size:
            raise PagedLLMError(f"the draft model's vocabulary ({self.model.config.vocab_size} tokens) differs from "
                                f"the target's ({vocab_size}); a draft must share the tokenizer")
        spec = plan_kv_cache(self.model.config, block_size, kv_cache_memory_bytes, dtype)
        if spec.num_blocks < 1:
            raise PagedLLMError(f"draft kv cache memory {kv_cache_memory_bytes} bytes is less than one block")
        self.kv_cache = KVCacheManager(spec.num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(self.model, spec, device, dtype, attention_backend)
        self.num_tokens = num_tokens
        self.mirrors: dict[str, Sequence] = {}

    def propose_for(self, sequences: list[Sequence], limits: list[int]) -> list[list[int]]:
        """Up to min(num_tokens, limit) greedy draft tokens per sequence."""
        wanted = {r.seq_id for r in sequences}
        for seq_id in [i for i in self.mirrors if i not in wanted]:
            self._forget(seq_id)
        counts = {r.seq_id: min(self.num_tokens, limit) for r, limit in zip(sequences, limits)}
        mirrors = [self._sync(r) for r in sequences if counts[r.seq_id] > 0]
        for step in range(max(counts.values(), default=0)):
            self._draft_one([m for m in mirrors if counts[m.seq_id] > step and m.seq_id in self.mirrors])
        return [list(self.mirrors[r.seq_id].output_token_ids) if r.seq_id in self.mirrors else []
                for r in sequences]

    def _sync(self, target: Sequence) -> Sequence:
        """The mirror of `target`, its cached prefix cut back to where it still agrees with the target."""
        tokens = target.all_token_ids
        mirror = self.mirrors.get(target.seq_id)
        if mirror is None:
            mirror = self.mirrors[target.seq_id] = Sequence(target.seq_id, tokens, SamplingParams())
            return mirror
        old, keep = mirror.all_token_ids, min(mirror.num_computed_tokens, len(tokens) - 1)
        while keep > 0 and old[keep - 1] != tokens[keep - 1]:  # only the rejected drafts differ
            keep -= 1
        mirror.prompt_token_ids, mirror.output_token_ids, mirror.num_computed_tokens = tokens, [], keep
        return mirror

    @torch.inference_mode()
    def _draft_one(self, mirrors: list[Sequence]) -> None:
        scheduled = []
        for mirror in mirrors:
            num_new = mirror.num_tokens - mirror.num_computed_tokens
            if self.kv_cache.allocate_slots(mirror, num_new) is None:
                self._forget(mirror.seq_id)  # the draft's cache is full: this sequence goes without drafts
                continue
            scheduled.append(ScheduledSequence(mirror, num_new))
        if not scheduled:
            return
        batch = self.runner.prepare(scheduled, [self.kv_cache.block_table(s.sequence) for s in scheduled])
        tokens = self.runner.execute(batch).logits.argmax(dim=-1).tolist()
        for item, token in zip(scheduled, tokens):
            item.sequence.num_computed_tokens += item.num_new_tokens
            item.sequence.output_token_ids.append(token)

    def _forget(self, seq_id: str) -> None:
        self.kv_cache.free(self.mirrors.pop(seq_id))
