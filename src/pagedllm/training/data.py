"""Supervised fine-tuning data: JSONL rows → token ids, the answer tokens the loss is taken on, a channel.

A row is `{"messages": [...]}` (a chat, rendered with the model's chat template: every assistant turn is
an answer) or `{"prompt": "...", "completion": "..."}` (the completion and the end-of-sequence token are
the answer), with an optional `"channel"` naming the data's source or kind: the trainer logs one loss
curve per channel. The rest of the row is ignored. Rows are untrusted: a malformed one stops the run with
its line number and the reason before any training starts.

The order of the rows is one seeded permutation per epoch; an optimizer step takes the next
`global_batch` rows of it, and rank r of a data-parallel run takes every world-th of those.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import PagedLLMError
from ..tokenizer.chat_template import ChatTemplateError
from ..tokenizer.tokenizer import Tokenizer, TokenizerError

DEFAULT_CHANNEL = "default"


class DataError(PagedLLMError, ValueError):
    """A training file or row that cannot be used; the message names the line and the problem."""


@dataclass(frozen=True)
class Example:
    ids: list[int]
    answer: list[bool]  # answer[i]: token i is an answer token (learnt from the tokens before it)
    channel: str

    @property
    def answer_tokens(self) -> int:
        return sum(self.answer[1:])  # the first token has nothing before it to be predicted from


@dataclass(frozen=True)
class Dataset:
    examples: list[Example]
    channels: list[str]  # in order of first appearance
    truncated: int  # rows cut at max_length
    dropped: int  # rows left with no answer token after the cut


def read_dataset(path: str | Path, tokenizer: Tokenizer, max_length: int) -> Dataset:
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"training data {str(path)!r}: cannot read it ({exc})") from None
    examples, truncated, dropped = [], 0, 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            example = encode_row(_parse(line), tokenizer)
        except (DataError, ChatTemplateError, TokenizerError) as exc:
            raise DataError(f"{path}:{number}: {exc}") from None
        if len(example.ids) > max_length:
            truncated += 1
            example = Example(example.ids[:max_length], example.answer[:max_length], example.channel)
        if example.answer_tokens == 0:
            dropped += 1
            continue
        examples.append(example)
    if not examples:
        raise DataError(f"training data {path}: no row with an answer token to learn from"
                        + (f" ({dropped} were cut to nothing by --max-length {max_length})" if dropped else ""))
    channels = list(dict.fromkeys(e.channel for e in examples))
    return Dataset(examples, channels, truncated, dropped)


def _parse(line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"a row must be a JSON object, got {type(row).__name__}")
    return row


def encode_row(row: dict[str, Any], tokenizer: Tokenizer) -> Example:
    channel = row.get("channel", DEFAULT_CHANNEL)
    if not isinstance(channel, str) or not channel.strip() or len(channel) > 100:
        raise DataError(f"'channel' must be a non-empty string of at most 100 characters, got {channel!r}")
    if "messages" in row:
        segments = _chat_segments(row["messages"], tokenizer)
        bos: list[int] = []  # the rendered template holds BOS where the model wants one
    elif "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise DataError("'prompt' and 'completion' must be strings, the completion not empty")
        segments = [(prompt, False), (completion, True)]
        bos = tokenizer.encode("")  # what the tokenizer adds to a prompt (BOS, or nothing)
    else:
        raise DataError("a row needs 'messages', or 'prompt' and 'completion'")
    ids, answer = list(bos), [False] * len(bos)
    for text, is_answer in segments:
        piece = tokenizer.encode(text, add_special_tokens=False) if text else []
        ids += piece
        answer += [is_answer] * len(piece)
    if "messages" not in row and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)  # the model learns to stop after a completion
        answer.append(True)
    return Example(ids, answer, channel.strip())


def _chat_segments(messages: Any, tokenizer: Tokenizer) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is an answer) pieces: each assistant turn is the text its
    message adds after the prompt that asks for it (its end-of-turn marker included)."""
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list")
    turns = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
    if not turns:
        raise DataError("the conversation has no assistant message to learn from")
    if turns[0] == 0:
        raise DataError("messages[0]: a conversation starts with a system or user message, not the assistant's")
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    segments, done = [], 0
    for turn in turns:
        asked = tokenizer.apply_chat_template(messages[:turn], add_generation_prompt=True)
        answered = tokenizer.apply_chat_template(messages[:turn + 1], add_generation_prompt=False)
        if not (answered.startswith(asked) and full.startswith(answered) and len(asked) >= done):
            raise DataError(f"messages[{turn}]: the chat template renders this conversation differently turn by "
                            "turn (it rewrites earlier turns), so its answers cannot be found; give "
                            "'prompt'/'completion' rows instead")
        segments += [(full[done:len(asked)], False), (full[len(asked):len(answered)], True)]
        done = len(answered)
    return segments + [(full[done:], False)]


@dataclass(frozen=True)
class BatchPlan:
    """Which rows each optimizer step takes. `global_batch` rows a step, over all ranks and micro-batches."""

    num_rows: int
    global_batch: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_rows / self.global_batch)

    def step_rows(self, step: int) -> list[int]:
        """The rows of optimizer step `step` (0-based, counted over epochs)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        return order[index * self.global_batch:(index + 1) * self.global_batch]

    @staticmethod
    def rank_rows(rows: list[int], rank: int, world: int) -> list[int]:
        return rows[rank::world]

    @staticmethod
    def micro_batches(rows: list[int], batch_size: int) -> list[list[int]]:
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def padded_batch(examples: list[Example], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows as transformers' trainers take them: ids padded on the right, the attention mask, and the
    labels (-100 outside the answers) — for comparing with a transformers model on the same rows."""
    longest = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for row, e in enumerate(examples):
        tokens = torch.tensor(e.ids)
        ids[row, :len(e.ids)], mask[row, :len(e.ids)] = tokens, 1
        labels[row, :len(e.ids)] = torch.where(torch.tensor(e.answer), tokens, -100)
    return ids, mask, labels

