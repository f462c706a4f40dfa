"""What one forward pass produced, per sequence (vLLM's ModelRunnerOutput), and how the runner reads it
out of the step's logits: which rows each sequence samples and with what state, its logprob rows, its
prompt's logprobs, the hidden states it keeps. The engine and the scheduler only see sequence ids."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..sampling.sampler import SamplerOutput, SequenceState, gather_logprobs
from .deltas import LogprobRow
from .scheduler import ScheduledSequence

GrammarMask = Callable[[Any], torch.Tensor]  # a grammar matcher → [vocab] bool of the tokens it allows next


@dataclass
class ModelRunnerOutput:
    # Per sequence that sampled: one token per scored row (its last token, then one per draft); a sequence
    # that fans out (n > 1, engine/request.py) has one per sample instead.
    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[LogprobRow]] = field(default_factory=dict)  # beside `sampled`, where reported
    # Per sequence that asked for prompt logprobs: the first prompt position scored, and its rows.
    prompt_logprobs: dict[str, tuple[int, list[LogprobRow]]] = field(default_factory=dict)
    # Per sequence that keeps final hidden states (pooling, contrastive search): first position, rows.
    hidden: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)
    # Per search sequence computed to its end: its logits row and its last hidden state (if kept).
    search_rows: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)


def sampling_rows(scheduled: list[ScheduledSequence], spans: list[tuple[int, int] | None],
                  grammar_mask: GrammarMask) -> tuple[list[str], list[int], list[SequenceState]]:
    """Per row to sample: its sequence id, the logits row it is drawn from, the sampler's state for it."""
    owners, sources, states = [], [], []
    for item, span in zip(scheduled, spans):
        sequence = item.sequence
        if span is None or sequence.pools or sequence.gang is not None:
            continue
        params, prompt, output = sequence.sampling_params, sequence.prompt_token_ids, sequence.output_token_ids
        allowed = grammar_mask(sequence.grammar) if sequence.grammar is not None else None
        if sequence.fan_out:
            rows = [SequenceState(params, prompt, output, g, sequence.stop_ids, allowed) for g in sequence.fan_out]
            sources += [span[0]] * len(rows)
        else:
            drafts = sequence.spec_token_ids
            rows = [SequenceState(params, prompt, output + drafts[:j], sequence.generator, sequence.stop_ids,
                                  allowed) for j in range(len(drafts) + 1)]
            sources += range(span[0], span[0] + len(rows))
        owners += [sequence.seq_id] * len(rows)
        states += rows
    return owners, sources, states


def record_sampled(out: ModelRunnerOutput, scheduled: list[ScheduledSequence], owners: list[str],
                   sampled: SamplerOutput) -> None:
    """The sampled tokens by sequence, and the logprob rows of the sequences that report them, each row cut
    to the sampled token and the top-N the request asked for."""
    tokens, rows = sampled.tokens.tolist(), logprob_rows(sampled)
    params = {item.sequence.seq_id: item.sequence.sampling_params for item in scheduled}
    for owner, token in zip(owners, tokens):
        out.sampled.setdefault(owner, []).append(token)
    if rows is None:
        return
    for owner, row in zip(owners, rows):
        if params[owner].reports_logprobs:
            out.logprobs.setdefault(owner, []).append(row[:1 + (params[owner].logprobs or 0)])


def record_prompt_logprobs(out: ModelRunnerOutput, scheduled: list[ScheduledSequence],
                           spans: list[tuple[int, int, int]], logits: torch.Tensor) -> None:
    """Each span's rows score the prompt's next tokens: (sequence index, first position, count)."""
    offset = 0
    for index, start, count in spans:
        sequence = scheduled[index].sequence
        rows, offset = logits[offset:offset + count], offset + count
        targets = torch.tensor(sequence.prompt_token_ids[start + 1:start + 1 + count], device=logits.device)
        top_n = sequence.sampling_params.prompt_logprobs
        scored = logprob_rows(gather_logprobs(rows, targets, top_n))
        out.prompt_logprobs[sequence.seq_id] = (start, [row[:1 + top_n] for row in scored])


def record_hidden(out: ModelRunnerOutput, scheduled: list[ScheduledSequence], spans: list[tuple[int, int, int]],
                  hidden: torch.Tensor | None) -> None:
    offset = 0
    for index, start, count in spans:
        out.hidden[scheduled[index].sequence.seq_id] = (start, hidden[offset:offset + count])
        offset += count


def record_search_rows(out: ModelRunnerOutput, scheduled: list[ScheduledSequence],
                       spans: list[tuple[int, int] | None], logits: torch.Tensor) -> None:
    for item, span in zip(scheduled, spans):
        seq_id = item.sequence.seq_id
        if span is not None and item.sequence.gang is not None:
            kept = out.hidden.get(seq_id)
            out.search_rows[seq_id] = (logits[span[0]], kept[1][-1] if kept is not None else None)


def logprob_rows(sampled: SamplerOutput) -> list[LogprobRow] | None:
    """Per row: (token, logprob, rank) of the sampled token, then the top-N as (token, logprob, rank)."""
    if sampled.logprobs is None:
        return None
    rows = [[(t, lp, r)] for t, lp, r in zip(sampled.tokens.tolist(), sampled.logprobs.tolist(),
                                               sampled.ranks.tolist())]
    if sampled.top_ids is not None:
        for row, ids, values in zip(rows, sampled.top_ids.tolist(), sampled.top_logprobs.tolist()):
            row += [(t, lp, rank) for rank, (t, lp) in enumerate(zip(ids, values), start=1)]
    return rows
