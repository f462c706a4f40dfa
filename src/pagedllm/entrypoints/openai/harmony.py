"""gpt-oss's harmony format: what the model writes after `<|start|>assistant`, split into reasoning, content and
tool calls — whole, or delta by delta while streaming.

A reply is a run of messages, each a header up to `<|message|>` and a body up to `<|end|>` (another message
follows, after `<|start|>assistant`), `<|return|>` (the reply is over) or `<|call|>` (a tool call waits for its
result). The header names the channel and, for a tool call, the recipient, before or after the channel:
`<|channel|>analysis` (chain of thought → `reasoning_content`), `<|channel|>final` (the answer → `content`),
`<|channel|>commentary` (a preamble the user may see → `content`), `to=functions.NAME<|channel|>commentary json`
or `<|channel|>commentary to=functions.NAME <|constrain|>json` (a call of NAME, its body the JSON arguments →
`tool_calls`). A recipient outside `functions` (the built-in browser and python tools, which pagedllm does not
run) is kept as reasoning. Decoding must keep the special tokens for these markers (skip_special_tokens off).
A model that writes no header at all is taken as plain content.
"""

from __future__ import annotations

import json
import re

from .reasoning import marker_prefix_length
from .tool_calls import ToolCall

MESSAGE, CHANNEL, CONSTRAIN, START = "<|message|>", "<|channel|>", "<|constrain|>", "<|start|>"
END, RETURN, CALL = "<|end|>", "<|return|>", "<|call|>"
_BODY_ENDS = (END, RETURN, CALL)
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
_CHANNEL = re.compile(re.escape(CHANNEL) + r"\s*([A-Za-z_]+)")
FUNCTIONS = "functions."


def is_harmony_template(chat_template: str | None) -> bool:
    return bool(chat_template) and CHANNEL in chat_template and MESSAGE in chat_template


class HarmonyParser:
    """Text in, (reasoning, content, calls) out: delta by delta with `feed`, then `finish`. `forced`: the output
    was made a call by a grammar (tool_choice required or named), so arguments cut short are dropped rather
    than given back as content."""

    def __init__(self, forced: bool = False):
        self.forced = forced
        self.state = "header"  # "header" (up to <|message|>), "body", or "plain" (no harmony markers at all)
        self.pending = ""
        self.kind = ""  # the body's destination: "reasoning", "content" or "call"
        self.function = ""  # a call's function name
        self.arguments = ""

    def parse(self, text: str) -> tuple[str, str, list[ToolCall]]:
        first, rest = self.feed(text), self.finish()
        return first[0] + rest[0], first[1] + rest[1], first[2] + rest[2]

    def feed(self, delta: str) -> tuple[str, str, list[ToolCall]]:
        self.pending += delta
        reasoning, content, calls = "", "", []
        while True:
            if self.state == "plain":
                content, self.pending = content + self.pending, ""
                return reasoning, content, calls
            if self.state == "header":
                at = self.pending.find(MESSAGE)
                if at < 0:
                    if self._not_a_header(self.pending):
                        self.state = "plain"
                        continue
                    return reasoning, content, calls
                self._read_header(self.pending[:at])
                self.pending, self.state = self.pending[at + len(MESSAGE):], "body"
            ends = [(self.pending.find(m), m) for m in _BODY_ENDS if m in self.pending]
            if not ends:
                held = max(marker_prefix_length(self.pending, m) for m in _BODY_ENDS)
                text, self.pending = self.pending[:len(self.pending) - held], self.pending[len(self.pending) - held:]
                r, c = self._body(text)
                return reasoning + r, content + c, calls
            at, marker = min(ends)
            r, c = self._body(self.pending[:at])
            reasoning, content = reasoning + r, content + c
            if self.kind == "call":
                calls.append(ToolCall(self.function, self.arguments.strip()))
            self.pending, self.state = self.pending[at + len(marker):], "header"

    def finish(self) -> tuple[str, str, list[ToolCall]]:
        """What was held back, once the text is complete: a call cut short is given back as content (unless
        forced), a header without its body dropped."""
        rest, self.pending = self.pending, ""
        if self.state == "plain":
            return "", rest, []
        if self.state == "header":
            return "", "", []
        reasoning, content = self._body(rest)
        if self.kind != "call":
            return reasoning, content, []
        if _is_json_object(self.arguments):
            return reasoning, content, [ToolCall(self.function, self.arguments.strip())]
        return reasoning, content if self.forced else content + self.arguments, []

    @staticmethod
    def _not_a_header(text: str) -> bool:
        """Text that cannot begin a message header: the model wrote plain text."""
        head = text.lstrip()
        return bool(head) and not head.startswith(("<|", "to=", "assistant")) and not "<|".startswith(head) \
            and not "to=".startswith(head)

    def _read_header(self, header: str) -> None:
        recipient = _RECIPIENT.search(header)
        channel = _CHANNEL.search(header)
        self.function, self.arguments = "", ""
        if recipient and recipient.group(1).startswith(FUNCTIONS):
            self.kind, self.function = "call", recipient.group(1)[len(FUNCTIONS):]
        elif recipient or (channel and channel.group(1) == "analysis"):
            self.kind = "reasoning"  # chain of thought, or a built-in tool's call pagedllm does not run
        else:
            self.kind = "content"

    def _body(self, text: str) -> tuple[str, str]:
        if self.kind == "call":
            self.arguments += text
            return "", ""
        return (text, "") if self.kind == "reasoning" else ("", text)


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False
