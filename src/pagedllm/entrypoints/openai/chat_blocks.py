"""What /v1/responses and /v1/messages share: a chat answer as a sequence of blocks (reasoning, text,
tool calls), whole or streamed. Both APIs open a block, extend it and close it, in order; an
adapter subclasses ChatBlocks with its own event shapes and gets the same blocks either way."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator
from typing import Any


def message_parts(message: dict) -> Iterator[tuple[str, Any]]:
    """A whole chat message as the parts a stream would have brought."""
    if message.get("reasoning_content"):
        yield "reasoning", message["reasoning_content"]
    if message.get("content"):
        yield "text", message["content"]
    for call in message.get("tool_calls") or ():
        yield "call", call


async def chunk_parts(chunks: AsyncIterator[dict]) -> AsyncIterator[tuple[str, Any]]:
    """The one choice's chunks as parts: ("reasoning" | "text", new text), ("call", a whole tool call),
    ("finish", (finish_reason, stop_reason)) and, last, ("usage", the usage)."""
    async for chunk in chunks:
        if chunk.get("usage"):
            yield "usage", chunk["usage"]
        for choice in chunk["choices"]:
            delta = choice["delta"]
            if delta.get("reasoning_content"):
                yield "reasoning", delta["reasoning_content"]
            if delta.get("content"):
                yield "text", delta["content"]
            for call in delta.get("tool_calls") or ():
                yield "call", call
            if choice["finish_reason"] is not None:
                yield "finish", (choice["finish_reason"], choice.get("stop_reason"))


class ChatBlocks(ABC):
    """Blocks opened and closed in order as parts arrive; subclasses say what each step emits and
    keep what the final object needs."""

    def __init__(self) -> None:
        self.kind: str | None = None  # the open block's kind ("reasoning" or "text")
        self.index = -1  # the open (or last) block's position

    def feed(self, kind: str, value: Any) -> list[dict]:
        events = []
        if kind == "call":
            events += self.close()
            self.index += 1
            events += self.call(value)
        elif kind in ("reasoning", "text"):
            if self.kind != kind:
                events += self.close()
                self.kind, self.index = kind, self.index + 1
                events += self.start(kind)
            events += self.extend(kind, value)
        return events

    def feed_message(self, message: dict) -> None:
        """A whole chat message, block by block (its events are not needed)."""
        for kind, value in message_parts(message):
            self.feed(kind, value)
        self.close()

    def close(self) -> list[dict]:
        if self.kind is None:
            return []
        kind, self.kind = self.kind, None
        return self.stop(kind)

    @abstractmethod
    def start(self, kind: str) -> list[dict]:
        """The events of this step."""

    @abstractmethod
    def extend(self, kind: str, text: str) -> list[dict]:
        """The events of this step."""

    @abstractmethod
    def stop(self, kind: str) -> list[dict]:
        """The events of this step."""

    @abstractmethod
    def call(self, call: dict) -> list[dict]:
        """The events of this step."""
