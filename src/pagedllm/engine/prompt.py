"""A request's prompt as token ids, and the error a request is refused with (in the core or its client)."""

from __future__ import annotations

from typing import Any

from ..errors import PagedLLMError
from ..tokenizer import Tokenizer

Prompt = str | list[int] | dict[str, Any]


class RequestError(PagedLLMError, ValueError):
    """A request the engine refuses at admission (too long, bad ids, duplicate id); `param`: the request
    field at fault, where one is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def prompt_ids(prompt: Prompt, tokenizer: Tokenizer) -> tuple[str | None, list[int]]:
    """The prompt's text (None for token ids) and its token ids."""
    if isinstance(prompt, str):
        try:
            prompt.encode("utf-8")  # what the tokenizer needs (Python strings may hold lone UTF-16 surrogates)
        except UnicodeEncodeError:
            raise RequestError("the prompt holds a lone UTF-16 surrogate, which is not valid Unicode", "prompt") from None
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        prompt = prompt["prompt_token_ids"]
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return None, list(prompt)
    raise RequestError("a prompt is a string, a list of token ids, or {'prompt_token_ids': [...]}")
