"""Chat templates, rendered in a sandboxed jinja2 environment.

Templates come from model files (GGUF metadata or tokenizer_config.json) and are untrusted:
the immutable sandbox blocks attribute tricks, and any error becomes a ChatTemplateError. A render is
bounded too: RENDER_SECONDS of time (a loop of 99,999 × 99,999 is stopped), MAX_RENDER_CHARS of output,
no `*` or `**` that would build a value past that size (`'a' * 300000000` drove `chat` to 20 GB), and no
method or filter given a count or width past it.
"""

from __future__ import annotations

import ctypes
import functools
import json
import threading
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import PagedLLMError, shown


RENDER_SECONDS = 2.0  # real templates render in about a millisecond
MAX_RENDER_CHARS = 8 * 2**20  # a rendered prompt longer than this could not fit any context anyway
MAX_POWER_BITS = 4096  # `**` on integers: the result's size


class ChatTemplateError(PagedLLMError, ValueError):
    """A chat template that cannot be compiled or rendered, or messages it rejects."""


class _RenderTimeout(BaseException):  # not Exception: nothing in jinja2 may swallow it
    """Raised inside the rendering thread when the deadline passes."""


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with `*` and `**` checked before they build a value too large to hold, and every method
    and filter refused a count or width past the output bound (`'x'.ljust(10**9)`, `s|center(10**9)`)."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.filters = {name: _bounded_call(f) for name, f in self.filters.items()}

    def call(self, __context, __obj, *args: Any, **kwargs: Any) -> Any:
        _check_sizes(args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*" and _repeat_size(left, right) > MAX_RENDER_CHARS:
            raise ChatTemplateError(f"chat template: a repetition longer than {MAX_RENDER_CHARS} characters")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) \
                and abs(left) > 1 and right * max(abs(left), 2).bit_length() > MAX_POWER_BITS:
            raise ChatTemplateError(f"chat template: a power past {MAX_POWER_BITS} bits")
        return super().call_binop(context, operator, left, right)


def _check_sizes(args: tuple, kwargs: dict) -> None:
    if any(isinstance(v, int) and abs(v) > MAX_RENDER_CHARS for v in (*args, *kwargs.values())):
        raise ChatTemplateError(f"chat template: a count or width past {MAX_RENDER_CHARS}")


def _bounded_call(function):
    """A filter whose integer arguments are checked first (jinja2 calls filters directly, not through the
    sandbox's call); its name and its pass_context / pass_environment marks are kept."""
    skip = 2 if getattr(function, "jinja_pass_arg", None) else 1  # the context / environment, the value filtered

    @functools.wraps(function)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_sizes(args[skip:], kwargs)
        return function(*args, **kwargs)
    return bounded


def _repeat_size(left: Any, right: Any) -> int:
    """The length `left * right` would have, where one side is a sequence and the other an integer."""
    for sequence, count in ((left, right), (right, left)):
        if isinstance(sequence, (str, list, tuple)) and isinstance(count, int):
            return len(sequence) * count
    return 0


class _Deadline:
    """After `seconds`, raise _RenderTimeout in the thread that entered (CPython's PyThreadState_SetAsyncExc:
    a render, pure Python, stops at its next bytecode). Leaving the block disarms it."""

    def __init__(self, seconds: float):
        self._thread, self._lock, self._armed, self._fired = threading.get_ident(), threading.Lock(), True, False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def _fire(self) -> None:
        with self._lock:
            if self._armed:
                self._fired = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread), ctypes.py_object(_RenderTimeout))

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        with self._lock:
            self._armed = False
            if self._fired:  # raised but perhaps not delivered yet: take it back
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread), None)


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
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
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
        with _Deadline(RENDER_SECONDS):
            return _bounded_render(template, dict(messages=validate_messages(messages),
                                                  add_generation_prompt=add_generation_prompt, **variables))
    except _RenderTimeout:
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
