"""Response bodies in OpenAI's shapes, built from the engine's RequestOutputs."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, replace

from ...engine.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from ...tokenizer import Tokenizer
from .harmony import HarmonyParser
from .reasoning import ReasoningSplitter
from .tool_calls import ToolCall, ToolCallParser


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _positions(c: CompletionOutput, delta: bool) -> tuple[list[int], list[PositionLogprobs]]:
    """Token ids and their logprob entries: all of them, or those new in this output."""
    ids = c.delta_token_ids if delta else c.token_ids
    entries = (c.delta_logprobs if delta else c.logprobs) or []
    return ids, entries


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _top(entry: PositionLogprobs, top_n: int) -> list[int]:
    """The ids of the entry's `top_n` most likely tokens, best first."""
    return sorted(entry, key=lambda token_id: entry[token_id].rank)[:top_n]


def completion_logprobs(c: CompletionOutput, top_n: int, tokenizer: Tokenizer, delta: bool = False) -> dict:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    ids, entries = _positions(c, delta)
    tokens = [_token_text(tokenizer, t) for t in ids]
    offsets, at = [], len(c.text) - len(c.delta_text) if delta else 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {"tokens": tokens,
            "token_logprobs": [entry[t].logprob for t, entry in zip(ids, entries)],
            "top_logprobs": [{entry[t].decoded_token: entry[t].logprob for t in _top(entry, top_n)} for entry in entries],
            "text_offset": offsets}


def chat_logprobs(c: CompletionOutput, top_n: int, tokenizer: Tokenizer, delta: bool = False) -> dict:
    """The chat shape: per token its text, logprob, UTF-8 bytes and the top_n alternatives."""
    ids, entries = _positions(c, delta)
    return {"content": logprob_content(ids, entries, top_n)}


def logprob_content(ids: list[int], entries: list[PositionLogprobs | None], top_n: int) -> list[dict | None]:
    """Per position (None where there is no entry, as for the first prompt token) the chat shape's item,
    with pagedllm's `token_id` beside OpenAI's fields (what the web page forks from)."""
    def item(token_id: int, entry: PositionLogprobs) -> dict:
        text = entry[token_id].decoded_token
        return {"token": text, "logprob": entry[token_id].logprob, "bytes": list(text.encode()), "token_id": token_id}

    return [None if entry is None else
            {**item(t, entry), "top_logprobs": [item(top, entry) for top in _top(entry, top_n)]}
            for t, entry in zip(ids, entries)]


@dataclass(frozen=True)
class Echo:
    """Completions' `echo`: the prompt text a choice starts with. prompt_only (max_tokens 0, scoring):
    the one token the engine generated alongside the prompt's logprobs is dropped."""

    text: str
    prompt_only: bool = False

    def generated(self, c: CompletionOutput) -> CompletionOutput:
        if not self.prompt_only:
            return c
        return replace(c, text="", token_ids=[], delta_text="", delta_token_ids=[], cumulative_logprob=None,
                       logprobs=None if c.logprobs is None else [], delta_logprobs=None if c.logprobs is None else [],
                       finish_reason="length", stop_reason=None)


def prompt_logprobs(output: RequestOutput, top_n: int, tokenizer: Tokenizer) -> dict:
    """The prompt's tokens in the legacy logprobs shape; the first has no logprob (null), as in OpenAI's."""
    entries = output.prompt_logprobs or [None]
    tokens = [_token_text(tokenizer, t) for t in output.prompt_token_ids]
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {"tokens": tokens,
            "token_logprobs": [None if e is None else e[t].logprob for t, e in zip(output.prompt_token_ids, entries)],
            "top_logprobs": [None if e is None else {e[t].decoded_token: e[t].logprob for t in _top(e, top_n)}
                             for e in entries],
            "text_offset": offsets}


def completion_choice(index: int, c: CompletionOutput, top_logprobs: int | None, tokenizer: Tokenizer,
                      delta: bool = False, echo: tuple[RequestOutput, Echo] | None = None) -> dict:
    """`echo`: the request's output and its Echo, for the choice (or first chunk) that starts with the prompt."""
    logprobs = completion_logprobs(c, top_logprobs, tokenizer, delta) if top_logprobs is not None else None
    text = c.delta_text if delta else c.text
    if echo is not None:
        output, prompt = echo
        if logprobs is not None:
            scored = prompt_logprobs(output, top_logprobs, tokenizer)
            shift = len(prompt.text)
            logprobs = {key: scored[key] + ([o + shift for o in logprobs[key]] if key == "text_offset" else logprobs[key])
                        for key in scored}
        text = prompt.text + text
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason}


def completion_response(request_id: str, created: int, model: str, outputs: list[RequestOutput], n: int,
                        top_logprobs: int | None, tokenizer: Tokenizer, token_ids: bool = False,
                        echo: list[Echo] | None = None) -> dict:
    choices, completion_tokens = [], 0
    for i, output in enumerate(outputs):
        for c in output.outputs:
            c = echo[i].generated(c) if echo else c
            completion_tokens += len(c.token_ids)
            choices.append(completion_choice(i * n + c.index, c, top_logprobs, tokenizer,
                                             echo=(output, echo[i]) if echo else None)
                           | ({"token_ids": c.token_ids} if token_ids else {}))
            if token_ids:
                _add_top_token_ids(choices[-1], c, top_logprobs, delta=False)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(request_id: str, created: int, model: str, index: int, c: CompletionOutput,
                     top_logprobs: int | None, tokenizer: Tokenizer, token_ids: bool = False,
                     echo: tuple[RequestOutput, Echo] | None = None) -> dict:
    """`echo`: for a choice's first chunk, which carries the prompt (see completion_choice)."""
    choice = completion_choice(index, c, top_logprobs, tokenizer, delta=True, echo=echo)
    if token_ids:
        choice["token_ids"] = c.delta_token_ids
        _add_top_token_ids(choice, c, top_logprobs, delta=True)
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [choice], "usage": None}


def _add_top_token_ids(choice: dict, c: CompletionOutput, top_n: int | None, delta: bool) -> None:
    """With return_token_ids, the ids of each position's top_logprobs, in their order (pagedllm's extension:
    the legacy shape keys alternatives by text, which cannot tell two tokens of one spelling apart)."""
    if choice.get("logprobs") is not None and top_n is not None:
        _, entries = _positions(c, delta)
        choice["logprobs"]["top_token_ids"] = [_top(entry, top_n) for entry in entries]


class ChoiceText:
    """One chat choice's text split into reasoning, content and tool calls, whole or delta by delta: by a reasoning
    splitter then a tool call parser, or by one parser of a format that interleaves them (gpt-oss's harmony)."""

    def __init__(self, reasoning: ReasoningSplitter | None = None, tools: ToolCallParser | None = None,
                 channels: HarmonyParser | None = None):
        self.reasoning, self.tools, self.channels = reasoning, tools, channels
        self.calls: list[ToolCall] = []

    def split(self, delta: str, final: bool) -> tuple[str, str, list[ToolCall]]:
        if self.channels is not None:
            reasoning, content, calls = self.channels.feed(delta)
            if final:
                rest = self.channels.finish()
                reasoning, content, calls = reasoning + rest[0], content + rest[1], calls + rest[2]
            self.calls += calls
            return reasoning, content, calls
        reasoning, content = self.reasoning.feed(delta) if self.reasoning else ("", delta)
        if final and self.reasoning:
            rest_reasoning, rest_content = self.reasoning.finish()
            reasoning, content = reasoning + rest_reasoning, content + rest_content
        calls = []
        if self.tools:
            content, calls = self.tools.feed(content)
            if final:
                rest_content, rest_calls = self.tools.finish()
                content, calls = content + rest_content, calls + rest_calls
        self.calls += calls
        return reasoning, content, calls

    def message(self, text: str) -> dict:
        reasoning, content, calls = self.split(text, final=True)
        message = {"role": "assistant", "content": None if calls and not content.strip() else content}
        if self.reasoning is not None or self.channels is not None:
            message["reasoning_content"] = reasoning or None
        if calls:
            message["tool_calls"] = [call.as_openai() for call in calls]
        return message

    def delta(self, text: str, final: bool) -> dict:
        """A chunk's delta; tool calls come whole, each with its index among the choice's calls."""
        first_call = len(self.calls)
        reasoning, content, calls = self.split(text, final)
        delta = {"reasoning_content": reasoning} if reasoning else {}
        if content or not (reasoning or calls):
            delta["content"] = content
        if calls:
            delta["tool_calls"] = [call.as_openai(first_call + i) for i, call in enumerate(calls)]
        return delta

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.calls else reason


def chat_response(request_id: str, created: int, model: str, output: RequestOutput, prompt_tokens: int,
                  top_logprobs: int | None, tokenizer: Tokenizer,
                  choice_text: Callable[[], ChoiceText] = ChoiceText) -> dict:
    """`choice_text`: a fresh ChoiceText per choice (its reasoning splitter and tool call parser)."""
    choices = []
    for c in output.outputs:
        text = choice_text()
        choices.append({"index": c.index, "message": text.message(c.text),
                        "logprobs": chat_logprobs(c, top_logprobs, tokenizer) if top_logprobs is not None else None,
                        "finish_reason": text.finish_reason(c.finish_reason), "stop_reason": c.stop_reason})
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage(prompt_tokens, sum(len(c.token_ids) for c in output.outputs))}


def chat_chunk(request_id: str, created: int, model: str, index: int, delta: dict,
               c: CompletionOutput | None = None, top_logprobs: int | None = None,
               tokenizer: Tokenizer | None = None, finish_reason: str | None = None) -> dict:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
    if c is not None:
        choice["finish_reason"] = finish_reason or c.finish_reason
        if top_logprobs is not None:
            choice["logprobs"] = chat_logprobs(c, top_logprobs, tokenizer, delta=True)
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [choice], "usage": None}


def embedding_response(model: str, outputs: list[RequestOutput], encoding_format: str) -> dict:
    """OpenAI's embeddings list; base64 is the float32 little-endian bytes (what the clients decode)."""
    def encoded(output: RequestOutput):
        values = output.embedding.float()
        if encoding_format == "base64":
            return base64.b64encode(values.numpy().astype("<f4").tobytes()).decode()
        return values.tolist()

    data = [{"object": "embedding", "index": i, "embedding": encoded(o)} for i, o in enumerate(outputs)]
    tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
