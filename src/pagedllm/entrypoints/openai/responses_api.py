"""OpenAI's Responses API (POST /v1/responses), stateless, as a thin adapter over chat completions.

Input items (messages with input_text / output_text parts, function_call and function_call_output
items) become chat messages; `instructions` a system message in front; flat function tools and
`tool_choice` the chat ones; `text.format` the response_format. The chat answer becomes output
items (a reasoning item, a message with output_text, function_call items), and a stream becomes
Responses events (response.created … response.completed). Nothing is stored: `previous_response_id`
is refused, `store` ignored.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .chat_blocks import ChatBlocks, chunk_parts
from .errors import APIError
from .protocol import TOOL_NAME, ChatCompletionRequest, RequestBody


class ResponsesTool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesNamedTool(BaseModel):
    type: Literal["function"]
    name: str


class ResponsesTextFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str = "response"
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")


class ResponsesText(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: ResponsesTextFormat | None = None


class InputPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None

    def as_chat_part(self) -> dict:
        return {"type": "text" if self.type in ("input_text", "output_text") else self.type, "text": self.text}


class InputItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["message", "function_call", "function_call_output", "reasoning"] = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[InputPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputPart] | None = None


class ResponsesRequest(RequestBody):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesNamedTool | None = None
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    text: ResponsesText | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    def as_chat(self) -> ChatCompletionRequest:
        if self.previous_response_id is not None:
            raise APIError(400, "this server keeps no responses: send the whole conversation in input",
                           "previous_response_id")
        body: dict[str, Any] = {
            "model": self.model, "messages": self.messages(), "parallel_tool_calls": self.parallel_tool_calls,
            "max_completion_tokens": self.max_output_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "stream": self.stream, "stream_options": {"include_usage": True} if self.stream else None}
        if self.tools:
            body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                             for t in self.tools]
        if self.tool_choice is not None:
            body["tool_choice"] = (self.tool_choice if isinstance(self.tool_choice, str) else
                                   {"type": "function", "function": {"name": self.tool_choice.name}})
        if self.text and self.text.format and self.text.format.type != "text":
            fmt = self.text.format
            body["response_format"] = {"type": fmt.type, "json_schema": {"name": fmt.name, "schema": fmt.json_schema}}
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise APIError(400, f"input: {first['msg']}", "input") from None

    def messages(self) -> list[dict]:
        items = [InputItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        for item in items:
            if item.type == "message":
                content = item.content if isinstance(item.content, str) or item.content is None else \
                    [part.as_chat_part() for part in item.content]
                messages.append({"role": item.role or "user", "content": content})
            elif item.type == "function_call":
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name or "", "arguments": item.arguments or "{}"}}
                if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                    messages[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif item.type == "function_call_output":
                output = item.output if isinstance(item.output, str) or item.output is None else \
                    "".join(part.text or "" for part in item.output)
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output or ""})
        if not messages:
            raise APIError(400, "input must hold at least one message", "input")
        return messages


class ResponseBuilder(ChatBlocks):
    """Output items from chat parts, and (streaming) the events that build them."""

    def __init__(self, body: ResponsesRequest, model: str):
        super().__init__()
        self.body, self.model = body, model
        self.id, self.created = f"resp_{uuid.uuid4().hex}", int(time.time())
        self.output: list[dict] = []
        self.sequence = 0
        self.finish: str | None = None
        self.usage: dict | None = None

    def response(self, status: str) -> dict:
        body = self.body
        incomplete = status == "completed" and self.finish == "length"
        return {
            "id": self.id, "object": "response", "created_at": self.created, "model": self.model,
            "status": "incomplete" if incomplete else status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.instructions, "output": self.output, "parallel_tool_calls": body.parallel_tool_calls,
            "tool_choice": (body.tool_choice if isinstance(body.tool_choice, str) or body.tool_choice is None
                            else body.tool_choice.model_dump()) or ("auto" if body.tools else "none"),
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or ()], "temperature": body.temperature,
            "top_p": body.top_p, "max_output_tokens": body.max_output_tokens, "metadata": body.metadata or {},
            "usage": self.usage and _usage(self.usage)}

    def event(self, kind: str, **fields: Any) -> dict:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    def start(self, kind: str) -> list[dict]:
        if kind == "reasoning":
            item = {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "summary": [],
                    "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"}
        else:
            item = {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "role": "assistant", "status": "in_progress",
                    "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}
        self.output.append(item)
        part = dict(item["content"][0])
        return [self.event("response.output_item.added", output_index=self.index, item=_empty(item)),
                self.event("response.content_part.added", output_index=self.index, item_id=item["id"],
                           content_index=0, part=part)]

    def extend(self, kind: str, text: str) -> list[dict]:
        item = self.output[self.index]
        item["content"][0]["text"] += text
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        return [self.event(name, output_index=self.index, item_id=item["id"], content_index=0, delta=text, **extra)]

    def stop(self, kind: str) -> list[dict]:
        item = self.output[self.index]
        item["status"] = "completed"
        part = item["content"][0]
        name = "response.reasoning_text.done" if kind == "reasoning" else "response.output_text.done"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        where = {"output_index": self.index, "item_id": item["id"], "content_index": 0}
        return [self.event(name, **where, text=part["text"], **extra),
                self.event("response.content_part.done", **where, part=part),
                self.event("response.output_item.done", output_index=self.index, item=item)]

    def call(self, call: dict) -> list[dict]:
        function = call["function"]
        item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
                "name": function["name"], "arguments": function["arguments"], "status": "completed"}
        self.output.append(item)
        where = {"output_index": self.index, "item_id": item["id"]}
        return [self.event("response.output_item.added", output_index=self.index,
                           item={**item, "arguments": "", "status": "in_progress"}),
                self.event("response.function_call_arguments.delta", **where, delta=item["arguments"]),
                self.event("response.function_call_arguments.done", **where, arguments=item["arguments"]),
                self.event("response.output_item.done", output_index=self.index, item=item)]

    def whole(self, chat: dict) -> dict:
        choice = chat["choices"][0]
        self.feed_message(choice["message"])
        self.finish, self.usage = choice["finish_reason"], chat["usage"]
        return self.response("completed")

    async def events(self, chunks: AsyncIterator[dict]) -> AsyncIterator[dict]:
        yield self.event("response.created", response=self.response("in_progress"))
        yield self.event("response.in_progress", response=self.response("in_progress"))
        async for kind, value in chunk_parts(chunks):
            if kind == "finish":
                self.finish = value[0]
            elif kind == "usage":
                self.usage = value
            for event in self.feed(kind, value):
                yield event
        for event in self.close():
            yield event
        yield self.event("response.completed", response=self.response("completed"))


def _empty(item: dict) -> dict:
    """A copy of the item as announced: its text grows before the events of one feed go out."""
    return {**item, "content": [{**part, "text": ""} for part in item["content"]]}


def _usage(chat_usage: dict) -> dict:
    return {"input_tokens": chat_usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": chat_usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat_usage["total_tokens"]}
