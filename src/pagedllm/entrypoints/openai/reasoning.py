"""Reasoning models' thinking kept apart from their answer: the text between a family's markers
(`<think>` … `</think>` for Qwen3, QwQ, DeepSeek-R1 and its distills) becomes `reasoning_content`,
the rest `content`.

A model may open its thinking itself, or its chat template may open it in the generation prompt
(DeepSeek-R1's does): a splitter starts inside the thinking when the prompt ends with the start
marker. Thinking left unclosed (the length ran out) stays reasoning. While streaming, text that
could be the beginning of a marker is held back until the next delta settles it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReasoningFormat:
    start: str
    end: str


# --reasoning-parser choices; `auto` picks the first whose markers the chat template mentions.
REASONING_FORMATS = {"think": ReasoningFormat("<think>", "</think>")}


def detect_format(chat_template: str | None) -> ReasoningFormat | None:
    for fmt in REASONING_FORMATS.values():
        if chat_template and fmt.start in chat_template and fmt.end in chat_template:
            return fmt
    return None


class ReasoningSplitter:
    """Text in, (reasoning, content) out — all at once with `split`, or delta by delta with `feed`."""

    def __init__(self, fmt: ReasoningFormat, prompt_text: str = ""):
        self.fmt = fmt
        self.state = "thinking" if prompt_text.rstrip().endswith(fmt.start) else "before"
        self.pending = ""  # text not yet given out: it may be part of a marker

    def split(self, text: str) -> tuple[str, str]:
        reasoning, content = self.feed(text)
        rest_reasoning, rest_content = self.finish()
        return reasoning + rest_reasoning, content + rest_content

    def feed(self, delta: str) -> tuple[str, str]:
        self.pending += delta
        reasoning, content = "", ""
        while True:
            if self.state == "before":  # the answer, unless the model opens its thinking first
                stripped = self.pending.lstrip()
                if stripped.startswith(self.fmt.start):
                    self.pending, self.state = stripped[len(self.fmt.start):], "thinking"
                    continue
                if stripped and not self.fmt.start.startswith(stripped):
                    self.state = "answer"
                    continue
                return reasoning, content
            if self.state == "thinking":
                at = self.pending.find(self.fmt.end)
                if at >= 0:
                    reasoning += self.pending[:at]
                    self.pending, self.state = self.pending[at + len(self.fmt.end):].lstrip("\n"), "after"
                    continue
                held = marker_prefix_length(self.pending, self.fmt.end)
                reasoning += self.pending[:len(self.pending) - held]
                self.pending = self.pending[len(self.pending) - held:]
                return reasoning, content
            if self.state == "after":  # the newlines after the end marker are not the answer's
                self.pending = self.pending.lstrip("\n")
                if not self.pending:
                    return reasoning, content
                self.state = "answer"
            content, self.pending = content + self.pending, ""
            return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What was held back, once the text is complete."""
        rest, self.pending = self.pending, ""
        return (rest, "") if self.state == "thinking" else ("", rest)


def marker_prefix_length(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker`."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
