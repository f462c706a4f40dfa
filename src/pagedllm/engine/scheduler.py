"""Scheduler: fills one token budget per step with decode tokens and prefill chunks.

Running sequences are served first (oldest first); waiting ones are admitted while budget,
sequence slots and KV blocks remain. When a running sequence cannot get a block, the newest
running sequence is preempted: its blocks are freed and it is queued again to be recomputed.
A running sequence with nothing to compute (a search sequence waiting for its siblings) is
skipped. When nothing at all can run because such idle sequences hold the blocks the first
waiting sequence needs, a whole other search ("gang") is preempted and queued behind the others:
each search fits the cache alone (checked at admission), so the first waiting one always gets in.

After the step, `update_from_output` appends each sequence's tokens from the runner's output and applies
the one stop rule (engine/stop_rule.py: EOS or one of the request's stop_token_ids once min_tokens are out,
max_tokens, the model's context), and ends a sequence whose structured-output grammar is complete.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from ..config import SchedulerConfig
from .kv_cache_manager import KVCacheManager
from .sequence import Sequence, SequenceStatus
from .stop_rule import StopRule


@dataclass
class ScheduledSequence:
    sequence: Sequence
    num_new_tokens: int  # draft tokens included
    num_spec_tokens: int = 0  # the last num_spec_tokens of them are drafts, checked this step

    @property
    def completes_prompt(self) -> bool:
        """After this step the sequence has caught up: its next token is sampled now."""
        sequence = self.sequence
        return sequence.num_computed_tokens + self.num_new_tokens - self.num_spec_tokens == sequence.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager, stop_rule: StopRule):
        self.config = config
        self.kv_cache = kv_cache
        self.stop_rule = stop_rule
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_draft_tokens = 0  # speculative decoding: drafts checked, and those the model agreed with
        self.num_accepted_drafts = 0

    def add_waiting(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def add_running(self, sequence: Sequence) -> None:
        """A fork of a running sequence: it joins the running set as it is (its KV is shared)."""
        sequence.status = SequenceStatus.RUNNING
        self.running.append(sequence)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        if not out.scheduled and self.waiting and self.running:  # idle search sequences hold the blocks
            out.preempted += self._yield_gang(self.waiting[0].gang)
            self._schedule_waiting(out, budget)
        return out

    def _yield_gang(self, keep: str | None) -> list[Sequence]:
        """Preempt the newest running search other than `keep`, all its sequences, to the back of the queue."""
        victim = next((r for r in reversed(self.running) if r.gang is not None and r.gang != keep), self.running[-1])
        gang = [r for r in self.running if r is victim or (victim.gang is not None and r.gang == victim.gang)]
        for sequence in gang:
            self.running.remove(sequence)
            self._preempt(sequence)
            self.waiting.remove(sequence)
            self.waiting.append(sequence)
        return gang

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            sequence = self.running[index]
            behind = sequence.num_tokens - sequence.num_computed_tokens
            if behind > 1 and self.kv_cache.uses_states:
                sequence.spec_token_ids.clear()  # a hybrid rolled back: its kept tokens first, drafts next step
            num_new = min(behind + len(sequence.spec_token_ids), budget)
            if not sequence.spec_token_ids:
                num_new = self.kv_cache.chunk_end(sequence, sequence.num_computed_tokens, num_new)
            if num_new == 0:
                index += 1
                continue
            if self.kv_cache.allocate_slots(sequence, num_new) is not None:
                del sequence.spec_token_ids[max(0, num_new - behind):]  # drafts past the budget wait
                if sequence.spec_token_ids and self.kv_cache.uses_states:
                    self.kv_cache.checkpoint_state(sequence)
                out.scheduled.append(ScheduledSequence(sequence, num_new, len(sequence.spec_token_ids)))
                budget -= num_new
                index += 1
                continue
            victim = self.running.pop()  # the newest running sequence
            self._preempt(victim)
            out.preempted.append(victim)
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            sequence = self.waiting[0]
            cached_blocks, num_cached = self.kv_cache.get_computed_blocks(sequence)
            remaining = sequence.num_tokens - num_cached
            if remaining > budget and not self.config.enable_chunked_prefill:
                break
            num_new = self.kv_cache.chunk_end(sequence, num_cached, min(remaining, budget))
            if self.kv_cache.allocate_slots(sequence, num_new, cached_blocks) is None:
                break
            self.waiting.popleft()
            sequence.status = SequenceStatus.RUNNING
            sequence.num_computed_tokens = num_cached
            sequence.num_cached_tokens = num_cached
            self.running.append(sequence)
            out.scheduled.append(ScheduledSequence(sequence, num_new))
            budget -= num_new

    def _preempt(self, sequence: Sequence) -> None:
        self.kv_cache.free(sequence)
        sequence.spec_token_ids.clear()
        sequence.status = SequenceStatus.PREEMPTED
        sequence.num_computed_tokens = 0
        sequence.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(sequence)

    def update_from_output(self, scheduled: list[ScheduledSequence],
                           sampled: dict[str, list[int]]) -> dict[str, list[int]]:
        """Record the step: the tokens each sequence computed, then its sampled tokens appended until the
        stop rule ends it.

        `sampled` holds, per sequence that sampled, one token per scored row. A sequence with drafts
        keeps the tokens up to the first one that differs from its draft (that one included: the
        model's own choice there); the K/V of the rejected drafts is written over later. Returns the
        appended tokens per sequence (a finished sequence's last one ended it)."""
        appended: dict[str, list[int]] = {}
        for item in scheduled:
            sequence = item.sequence
            tokens = sampled.get(sequence.seq_id, [])
            if item.num_spec_tokens:
                agreed = _agreed_prefix(sequence.spec_token_ids, tokens)
                tokens = tokens[:agreed + 1]
                self.num_draft_tokens += item.num_spec_tokens
                self.num_accepted_drafts += agreed
                sequence.spec_token_ids = []
                if agreed < item.num_spec_tokens and self.kv_cache.uses_states:
                    self.kv_cache.roll_back_state(sequence)  # the tokens kept are computed again, from before
                else:
                    sequence.num_computed_tokens = sequence.num_tokens + len(tokens) - 1  # the last kept is not
            else:
                sequence.num_computed_tokens += item.num_new_tokens
            appended[sequence.seq_id] = self._append(sequence, tokens)
        return appended

    def _append(self, sequence: Sequence, tokens: list[int]) -> list[int]:
        for count, token in enumerate(tokens, start=1):
            sequence.output_token_ids.append(token)
            sequence.first_token_time = sequence.first_token_time or time.monotonic()
            status = self._stop_status(sequence, token)
            if status is not None:
                self.finish(sequence, status)
                return tokens[:count]
        return tokens

    def _stop_status(self, sequence: Sequence, token: int) -> SequenceStatus | None:
        """The stop rule for a token just appended, then the grammar's; a stop token id is kept as the reason."""
        params = sequence.sampling_params
        status = self.stop_rule.status(params, len(sequence.prompt_token_ids), len(sequence.output_token_ids), token)
        sequence.ends_with_stop_token = status is SequenceStatus.FINISHED_STOPPED
        if sequence.ends_with_stop_token:
            sequence.stop_reason = self.stop_rule.stop_reason(params, token)
        if sequence.grammar is not None:
            sequence.grammar.consume_token(token)
            if status is None and sequence.grammar.is_stopped():  # the grammar is complete
                status = SequenceStatus.FINISHED_STOPPED
        return status

    def finish(self, sequence: Sequence, status: SequenceStatus) -> None:
        """End a sequence (stopped, aborted, timed out ...) and free its blocks."""
        sequence.status = status
        sequence.finish_time = time.monotonic()
        self.kv_cache.free(sequence)
        if sequence in self.running:
            self.running.remove(sequence)
        elif sequence in self.waiting:
            self.waiting.remove(sequence)


def _agreed_prefix(drafts: list[int], tokens: list[int]) -> int:
    """How many leading drafts the model sampled itself (tokens[j] is its choice after drafts[:j])."""
    agreed = 0
    while agreed < len(drafts) and agreed < len(tokens) - 1 and tokens[agreed] == drafts[agreed]:
        agreed += 1
    return agreed
