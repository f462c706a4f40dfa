"""Response bodies in OpenAI's shapes, built from the engine's RequestOutputs."""

from __future__ import annotations

from ...engine.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from ...tokenizer import Tokenizer


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _positions(c: CompletionOutput, delta: bool) -> tuple[list[int], list[PositionLogprobs]]:
    """Token ids and their logprob entries: all of them, or those new in this output."""
    ids = c.delta_token_ids if delta else c.token_ids
    entries = (c.logprobs or [])[len(c.token_ids) - len(ids):] if delta else (c.logprobs or [])
    return ids, entries


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _top(entry: PositionLogprobs, top_n: int) -> list:
    return sorted(entry.values(), key=lambda lp: lp.rank)[:top_n]


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
            "top_logprobs": [{lp.decoded_token: lp.logprob for lp in _top(entry, top_n)} for entry in entries],
            "text_offset": offsets}


def chat_logprobs(c: CompletionOutput, top_n: int, tokenizer: Tokenizer, delta: bool = False) -> dict:
    """The chat shape: per token its text, logprob, UTF-8 bytes and the top_n alternatives."""
    ids, entries = _positions(c, delta)
    return {"content": logprob_content(ids, entries, top_n)}


def logprob_content(ids: list[int], entries: list[PositionLogprobs | None], top_n: int) -> list[dict | None]:
    """Per position (None where there is no entry, as for the first prompt token) the chat shape's item."""
    def item(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return [None if entry is None else
            {**item(entry[t].decoded_token, entry[t].logprob),
             "top_logprobs": [item(lp.decoded_token, lp.logprob) for lp in _top(entry, top_n)]}
            for t, entry in zip(ids, entries)]


def completion_choice(index: int, c: CompletionOutput, top_logprobs: int | None, tokenizer: Tokenizer,
                      delta: bool = False) -> dict:
    return {"index": index, "text": c.delta_text if delta else c.text,
            "logprobs": completion_logprobs(c, top_logprobs, tokenizer, delta) if top_logprobs is not None else None,
            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}


def completion_response(request_id: str, created: int, model: str, outputs: list[RequestOutput], n: int,
                        top_logprobs: int | None, tokenizer: Tokenizer, token_ids: bool = False) -> dict:
    choices = [completion_choice(i * n + c.index, c, top_logprobs, tokenizer)
               | ({"token_ids": c.token_ids} if token_ids else {})
               for i, output in enumerate(outputs) for c in output.outputs]
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    completion_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(request_id: str, created: int, model: str, index: int, c: CompletionOutput,
                     top_logprobs: int | None, tokenizer: Tokenizer, token_ids: bool = False) -> dict:
    choice = completion_choice(index, c, top_logprobs, tokenizer, delta=True)
    if token_ids:
        choice["token_ids"] = c.delta_token_ids
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [choice], "usage": None}


def chat_response(request_id: str, created: int, model: str, output: RequestOutput, prompt_tokens: int,
                  top_logprobs: int | None, tokenizer: Tokenizer) -> dict:
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(c, top_logprobs, tokenizer) if top_logprobs is not None else None,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in output.outputs]
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage(prompt_tokens, sum(len(c.token_ids) for c in output.outputs))}


def chat_chunk(request_id: str, created: int, model: str, index: int, delta: dict,
               c: CompletionOutput | None = None, top_logprobs: int | None = None,
               tokenizer: Tokenizer | None = None) -> dict:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
    if c is not None:
        choice["finish_reason"] = c.finish_reason
        if top_logprobs is not None:
            choice["logprobs"] = chat_logprobs(c, top_logprobs, tokenizer, delta=True)
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [choice], "usage": None}
