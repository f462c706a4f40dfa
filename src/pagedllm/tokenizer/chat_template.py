"""Chat templates, rendered in a bounded jinja2 sandbox (template_sandbox.py).

Templates come from model files (GGUF metadata or tokenizer_config.json) and are untrusted: any error
becomes a ChatTemplateError, and a render is bounded in time (RENDER_SECONDS) and in the size of every value
it builds and of its output (MAX_RENDER_CHARS).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2

from ..errors import shown
from .template_sandbox import (MAX_RENDER_CHARS, RENDER_SECONDS, BoundedSandbox, ChatTemplateError, Deadline,
                               RenderTimeout, bounded_filter)

__all__ = ["ChatTemplateError", "MAX_RENDER_CHARS", "RENDER_SECONDS", "render_chat", "validate_messages"]


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template: {message}")


def _tojson(value: Any, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    """Hugging Face's tojson: plain JSON (jinja2's own escapes <, > and & for HTML, which would change
    the tool schemas and arguments the model reads)."""
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    # trim_blocks / lstrip_blocks as Hugging Face renders them, so outputs match token for token.
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = bounded_filter("tojson", _tojson)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from None


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] needs a string 'role'")
        if not isinstance(message.get("content", ""), (str, list, type(None))):
            raise ChatTemplateError(f"messages[{i}].content must be a string")
    return messages


def render_chat(source: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                **variables: Any) -> str:
    template = _compile(source)
    try:
        with Deadline(RENDER_SECONDS):
            return _bounded_render(template, dict(messages=validate_messages(messages),
                                                  add_generation_prompt=add_generation_prompt, **variables))
    except RenderTimeout:
        raise ChatTemplateError(f"chat template took longer than {RENDER_SECONDS:g} s to render") from None
    except ChatTemplateError:
        raise
    except Exception as exc:  # a template may fail in any way its author wrote
        raise ChatTemplateError(f"chat template failed to render: {type(exc).__name__}: {shown(str(exc), 200)}") \
            from None


def _bounded_render(template: jinja2.Template, variables: dict[str, Any]) -> str:
    parts, size = [], 0
    for part in template.generate(**variables):
        size += len(part)
        if size > MAX_RENDER_CHARS:
            raise ChatTemplateError(f"chat template renders more than {MAX_RENDER_CHARS} characters")
        parts.append(part)
    return "".join(parts)
