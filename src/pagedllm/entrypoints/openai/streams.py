"""The shapes a response streams in: server-sent events (OpenAI's `data:` lines, or named events), several
prompts' outputs merged as they come, and the completion and chat chunk streams."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from fastapi.responses import StreamingResponse

from ...engine.outputs import RequestOutput
from ...errors import PagedLLMError
from .errors import APIError, api_error, error_body
from .protocol import ChatCompletionRequest, CompletionRequest
from .responses import ChoiceText, Echo, chat_chunk, completion_chunk, usage

if TYPE_CHECKING:
    from .serving import OpenAIServer, Prompt

def sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except (APIError, PagedLLMError) as exc:  # the status line has gone out: the error travels as an event
            error = api_error(exc)
            yield f"data: {json.dumps(error_body(error.status, error.message, error.param, error.code))}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(lines(), media_type="text/event-stream")


def event_stream(events: AsyncIterator[dict], error_event: Callable[[APIError], dict]) -> StreamingResponse:
    """Server-sent events named after their type (the Responses and Anthropic streams); no [DONE]."""
    async def lines() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"
        except (APIError, PagedLLMError) as exc:
            error = error_event(api_error(exc))
            yield f"event: error\ndata: {json.dumps(error)}\n\n"
    return StreamingResponse(lines(), media_type="text/event-stream")


async def merge(gens: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several prompts as they come, tagged with the prompt's index."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, gen: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in gen:
                await queue.put((index, output))
        except Exception as exc:
            await queue.put((index, exc))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def then_probes(chunks: AsyncIterator[dict], probed: dict | list[dict]) -> AsyncIterator[dict]:
    """A stream's chunks, then one more with no choices that carries the probes."""
    last = None
    async for last in chunks:
        yield last
    if last is not None:
        yield {key: last[key] for key in ("id", "object", "created", "model")} | {"choices": [], "probes": probed}


async def completion_stream(server: OpenAIServer, body: CompletionRequest, request_id: str, created: int,
                             prompts: list[Prompt], gens: list[AsyncIterator[RequestOutput]],
                             echo: list[Echo] | None) -> AsyncIterator[dict]:
    """With echo, each choice's first chunk carries the prompt (and its logprobs) in front of its text."""
    model, generated = body.model or server.config.served_model_name, {}  # checked: the base or an adapter
    async for index, output in merge(gens):
        for c in output.outputs:
            if c.delta_text or c.finish_reason or c.delta_token_ids:
                choice = index * body.n + c.index
                first = echo is not None and choice not in generated
                c = echo[index].generated(c) if echo else c
                generated[choice] = len(c.token_ids)
                yield completion_chunk(request_id, created, model, choice, c, body.logprobs, server.tokenizer,
                                       body.return_token_ids, (output, echo[index]) if first else None)
    if body.stream_options and body.stream_options.include_usage:
        yield {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": [],
               "usage": usage(sum(len(p.ids) for p in prompts), sum(generated.values()))}


async def chat_stream(server: OpenAIServer, body: ChatCompletionRequest, request_id: str, created: int,
                       prompt: Prompt, gen: AsyncIterator[RequestOutput],
                       choice_text: Callable[[], ChoiceText]) -> AsyncIterator[dict]:
    """Each choice's deltas go through its own ChoiceText: reasoning, content and tool calls apart,
    text that may be a marker held back until the next delta (or the end)."""
    model, generated = body.model or server.config.served_model_name, {}  # checked: the base or an adapter
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    texts = {index: choice_text() for index in range(body.n)}
    for index in range(body.n):
        yield chat_chunk(request_id, created, model, index, {"role": "assistant", "content": ""})
    async for output in gen:
        for c in output.outputs:
            if c.delta_text or c.finish_reason or c.delta_token_ids:
                generated[c.index] = len(c.token_ids)
                text = texts[c.index]
                delta = text.delta(c.delta_text, c.finish_reason is not None)
                if delta == {"content": ""} and c.finish_reason is None and top_logprobs is None:
                    continue  # all held back (a call being written, a marker's beginning)
                yield chat_chunk(request_id, created, model, c.index, delta, c, top_logprobs, server.tokenizer,
                                 text.finish_reason(c.finish_reason))
    if body.stream_options and body.stream_options.include_usage:
        yield {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [], "usage": usage(len(prompt.ids), sum(generated.values()))}

