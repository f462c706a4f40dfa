"""Anthropic's Messages API (POST /v1/messages) as a thin adapter over chat completions.

`system` (text or text blocks) becomes a system message; content blocks become chat content:
`text` blocks text, `tool_use` blocks the assistant's tool_calls, `tool_result` blocks `tool`
messages; `tools` (input_schema) and `tool_choice` (auto / any / tool / none) the chat ones;
`thinking` {"type": "enabled" | "disabled"} the template's enable_thinking. The answer comes back
as thinking, text and tool_use blocks with Anthropic's stop reasons, and a stream as its events
(message_start … message_stop). Errors on this route are in Anthropic's shape.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .chat_blocks import ChatBlocks, chunk_parts
from .errors import APIError
from .protocol import TOOL_NAME, ChatCompletionRequest, RequestBody

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


class TextBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None
    id: str | None = None  # tool_use
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None  # tool_result
    content: str | list[TextBlock] | None = None
    is_error: bool = False

    def text_of(self) -> str:
        """A text block's text (tool_result content is text or text blocks); other kinds are refused."""
        if self.type == "text":
            return self.text or ""
        if self.type in ("image", "document", "audio"):
            raise APIError(400, f"this model reads text only: a content block of type {self.type!r} cannot be "
                                f"given to it", "messages")
        raise APIError(400, f"a content block of type {self.type!r} cannot appear here", "messages")


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["user", "assistant"]
    content: str | list[TextBlock]


class AnthropicTool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class AnthropicToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Thinking(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["enabled", "disabled", "adaptive"]


class MessagesRequest(RequestBody):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    thinking: Thinking | None = None
    metadata: dict[str, Any] | None = None

    def as_chat(self) -> ChatCompletionRequest:
        body: dict[str, Any] = {
            "model": self.model, "messages": self.chat_messages(), "max_tokens": self.max_tokens,
            "stop": self.stop_sequences, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "stream": self.stream, "stream_options": {"include_usage": True} if self.stream else None}
        if self.tools:
            body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                               "parameters": t.input_schema}} for t in self.tools]
        if self.tool_choice is not None:
            body |= self._tool_choice(self.tool_choice)
        if self.thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": self.thinking.type != "disabled"}
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise APIError(400, f"messages: {exc.errors()[0]['msg']}", "messages") from None

    @staticmethod
    def _tool_choice(choice: AnthropicToolChoice) -> dict:
        if choice.type == "tool" and not choice.name:
            raise APIError(400, "tool_choice of type tool needs a name", "tool_choice")
        named = {"type": "function", "function": {"name": choice.name}}
        chat = {"auto": "auto", "any": "required", "none": "none", "tool": named}[choice.type]
        return {"tool_choice": chat, "parallel_tool_calls": not choice.disable_parallel_tool_use}

    def chat_messages(self) -> list[dict]:
        messages = []
        if self.system:
            system = self.system if isinstance(self.system, str) else "".join(b.text_of() for b in self.system)
            messages.append({"role": "system", "content": system})
        for message in self.messages:
            messages += _chat_turn(message)
        return messages


def _chat_turn(message: AnthropicMessage) -> list[dict]:
    """One Anthropic turn as chat messages: tool results first (as `tool` messages), then the text
    and, from the assistant, its tool calls."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    results, texts, calls = [], [], []
    for block in message.content:
        if block.type == "tool_result":
            content = block.content if isinstance(block.content, str) or block.content is None else \
                "".join(b.text_of() for b in block.content)
            results.append({"role": "tool", "tool_call_id": block.tool_use_id,
                            "content": f"Error: {content}" if block.is_error else content or ""})
        elif block.type == "tool_use" and message.role == "assistant":
            calls.append({"id": block.id, "type": "function", "function": {
                "name": block.name or "", "arguments": json.dumps(block.input or {}, ensure_ascii=False)}})
        elif block.type in ("thinking", "redacted_thinking"):
            continue  # earlier thinking is not shown to the model again, as chat templates drop it
        else:
            texts.append(block.text_of())
    turn = {"role": message.role, "content": "".join(texts) or (None if calls else "")}
    if calls:
        turn["tool_calls"] = calls
    return results + ([turn] if texts or calls or not results else [])


class MessageBuilder(ChatBlocks):
    """Content blocks from chat parts, and (streaming) the events that build them."""

    def __init__(self, model: str, prompt_tokens: int = 0):
        super().__init__()
        self.model, self.id = model, f"msg_{uuid.uuid4().hex}"
        self.content: list[dict] = []
        self.usage = {"input_tokens": prompt_tokens, "output_tokens": 0}
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None

    def message(self) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": self.content,
                "stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence, "usage": dict(self.usage)}

    def finished(self, finish_reason: str | None, stop_reason: Any) -> None:
        matched = isinstance(stop_reason, str)
        self.stop_reason = "stop_sequence" if matched else STOP_REASONS.get(finish_reason, "end_turn")
        self.stop_sequence = stop_reason if matched else None

    def start(self, kind: str) -> list[dict]:
        block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "reasoning" else \
            {"type": "text", "text": ""}
        self.content.append(block)
        return [{"type": "content_block_start", "index": self.index, "content_block": dict(block)}]

    def extend(self, kind: str, text: str) -> list[dict]:
        field = "thinking" if kind == "reasoning" else "text"
        self.content[self.index][field] += text
        return [{"type": "content_block_delta", "index": self.index,
                 "delta": {"type": f"{field}_delta", field: text}}]

    def stop(self, kind: str) -> list[dict]:
        return [{"type": "content_block_stop", "index": self.index}]

    def call(self, call: dict) -> list[dict]:
        function = call["function"]
        block = {"type": "tool_use", "id": call["id"], "name": function["name"],
                 "input": json.loads(function["arguments"])}
        self.content.append(block)
        return [{"type": "content_block_start", "index": self.index, "content_block": {**block, "input": {}}},
                {"type": "content_block_delta", "index": self.index,
                 "delta": {"type": "input_json_delta", "partial_json": function["arguments"]}},
                {"type": "content_block_stop", "index": self.index}]

    def whole(self, chat: dict) -> dict:
        choice = chat["choices"][0]
        self.feed_message(choice["message"])
        self.finished(choice["finish_reason"], choice.get("stop_reason"))
        self.usage = {"input_tokens": chat["usage"]["prompt_tokens"],
                      "output_tokens": chat["usage"]["completion_tokens"]}
        return self.message()

    async def events(self, chunks: AsyncIterator[dict]) -> AsyncIterator[dict]:
        yield {"type": "message_start", "message": self.message()}
        async for kind, value in chunk_parts(chunks):
            if kind == "finish":
                self.finished(*value)
            elif kind == "usage":
                self.usage["output_tokens"] = value["completion_tokens"]
            for event in self.feed(kind, value):
                yield event
        for event in self.close():
            yield event
        yield {"type": "message_delta", "delta": {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence},
               "usage": dict(self.usage)}
        yield {"type": "message_stop"}
