"""The jinja2 sandbox chat templates render in, bounded in time and in the size of every value they build.

Templates come from model files and are untrusted. The immutable sandbox blocks attribute tricks; on top of
it every operation that can make a string or list larger than its inputs is checked before it runs, against
MAX_RENDER_CHARS (a rendered prompt longer than that could not fit any context anyway): `*`, `**`, `+`, `~`,
block captures, the growing str methods and filters (`replace`, `join`, `format`, `%`, `indent`, `wordwrap`,
`expandtabs`, widths and counts). `'a' * 300000000` drove `chat` to 20 GB before these checks. A render is
bounded in time by a Deadline on its thread: a loop of 99,999 × 99,999 is stopped at its next bytecode.
"""

from __future__ import annotations

import ctypes
import functools
import re
import string
import threading
from collections.abc import Callable, Iterable
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import PagedLLMError


RENDER_SECONDS = 2.0  # real templates render in about a millisecond
MAX_RENDER_CHARS = 8 * 2**20
MAX_POWER_BITS = 4096  # `**` on integers: the result's size

_PRINTF_WIDTHS = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\d*)(?:\.(\d*))?")


class ChatTemplateError(PagedLLMError, ValueError):
    """A chat template that cannot be compiled or rendered, or messages it rejects."""


class RenderTimeout(BaseException):  # not Exception: nothing in jinja2 may swallow it
    """Raised inside the rendering thread when the deadline passes."""


def _too_large(what: str) -> ChatTemplateError:
    return ChatTemplateError(f"chat template: {what} past {MAX_RENDER_CHARS} characters")


def _check(size: int, what: str) -> None:
    if size > MAX_RENDER_CHARS:
        raise _too_large(what)


def _check_counts(args: Iterable[Any]) -> None:
    """No integer argument (a width, a count, a tab size) may exceed the output bound."""
    if any(isinstance(v, int) and abs(v) > MAX_RENDER_CHARS for v in args):
        raise _too_large("a count or width")


def _check_format(template: str, printf: bool) -> None:
    """The widths and precisions written inside a format string (`'%01000000000d'`, `'{:>1000000000}'`)."""
    if printf:
        numbers = [n for pair in _PRINTF_WIDTHS.findall(template) for n in pair]
    else:
        try:
            numbers = [n for _, _, spec, _ in string.Formatter().parse(template) if spec
                       for n in re.findall(r"\d+", spec)]
        except ValueError:
            return  # a malformed format string fails when it is applied
    _check_counts(int(n) for n in numbers if n)


def _join_size(items: list[Any] | tuple | str, separator: Any) -> int:
    return sum(len(str(v)) for v in items) + len(str(separator)) * max(len(items) - 1, 0)


def bounded_concat(values: Iterable[Any]) -> str:
    """jinja2's `concat` (block captures, macros, the render) and `~`, with the size checked first."""
    texts = [str(v) for v in values]
    _check(sum(map(len, texts)), "a concatenation")
    return "".join(texts)


def _replace_size(s: Any, old: Any = "", new: Any = "", *_: Any, **__: Any) -> int:
    s, old, new = str(s), str(old), str(new)
    return len(s) + s.count(old) * max(0, len(new) - len(old))


def _indent_size(s: Any, width: Any = 4, *_: Any, **__: Any) -> int:
    pad = len(width) if isinstance(width, str) else max(width, 0) if isinstance(width, int) else 0
    s = str(s)
    return len(s) + (s.count("\n") + 1) * pad


def _wordwrap_size(s: Any, width: Any = 79, break_long_words: Any = True, wrapstring: Any = None, *_: Any,
                   **__: Any) -> int:
    s = str(s)
    lines = len(s) // max(width, 1) if isinstance(width, int) else len(s)
    return len(s) + (lines + s.count("\n") + 1) * len(str(wrapstring or "\n"))


def _expandtabs_size(s: Any, tabsize: Any = 8, *_: Any, **__: Any) -> int:
    s = str(s)
    return len(s) + s.count("\t") * (max(tabsize, 0) if isinstance(tabsize, int) else 8)


# The size of the result, before it is built, of the str methods and filters that can grow their input.
_GROWTH: dict[str, Callable[..., int]] = {"replace": _replace_size, "indent": _indent_size,
                                          "wordwrap": _wordwrap_size, "expandtabs": _expandtabs_size}


def _check_growth(name: str, subject: Any, args: tuple, kwargs: dict, printf: bool) -> None:
    """Before a str method or filter named `name` runs on `subject`: its counts and widths, the widths inside
    a format string, and the size of a result that can grow."""
    _check_counts((*args, *kwargs.values()))
    if name in ("format", "format_map") and isinstance(subject, str):
        _check_format(subject, printf)
    if name in _GROWTH:
        _check(_GROWTH[name](subject, *args, **kwargs), f"the result of {name}")


def bounded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """A filter checked before it runs (jinja2 calls filters directly, not through the sandbox's `call`); its
    name and its pass_context / pass_environment marks are kept."""
    skip = 1 if getattr(function, "jinja_pass_arg", None) else 0  # the context / environment

    @functools.wraps(function)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        passed, value, rest = args[:skip], args[skip] if len(args) > skip else None, args[skip + 1:]
        if name == "join":  # the items may be a generator: take them once, then measure
            value = value if isinstance(value, (list, tuple, str)) else list(value)
            _check(_join_size(value, rest[0] if rest else kwargs.get("d", "")), "a join")
        _check_growth(name, value, rest, kwargs, printf=True)
        return function(*passed, value, *rest, **kwargs)
    return bounded


def _repeat_size(left: Any, right: Any) -> int:
    """The length `left * right` would have, where one side is a sequence and the other an integer."""
    for sequence, count in ((left, right), (right, left)):
        if isinstance(sequence, (str, list, tuple)) and isinstance(count, int):
            return len(sequence) * count
    return 0


class _BoundedTemplate(jinja2.Template):
    """A template whose `~` builds its string through bounded_concat (jinja2 compiles `~` to a module-level
    `str_join`, which no sandbox hook sees)."""

    @classmethod
    def _from_namespace(cls, environment: jinja2.Environment, namespace: Any, globals: Any) -> jinja2.Template:
        namespace["str_join"] = bounded_concat
        return super()._from_namespace(environment, namespace, globals)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with every value-growing operation checked before it runs."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    template_class = _BoundedTemplate
    concat = staticmethod(bounded_concat)

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.filters = {name: bounded_filter(name, f) for name, f in self.filters.items()}

    def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        subject, name = getattr(__obj, "__self__", None), getattr(__obj, "__name__", "")
        if isinstance(subject, str):
            if name == "join" and args:
                args = (list(args[0]), *args[1:])
                _check(_join_size(args[0], subject), "a join")
            _check_growth(name, subject, args, kwargs, printf=False)
        else:  # a mapping's values too: the widths of `'{:{w}}'.format_map(...)`
            _check_counts((*args, *kwargs.values(), *(v for a in args if isinstance(a, dict) for v in a.values())))
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """`str.format` is wrapped when it is looked up (jinja2 formats through its own sandboxed formatter):
        the widths written in the format string are checked then."""
        if isinstance(getattr(value, "__self__", None), str) and getattr(value, "__name__", "") in ("format", "format_map"):
            _check_format(value.__self__, printf=False)
        return super().wrap_str_format(value)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            _check(_repeat_size(left, right), "a repetition")
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            _check(len(left) + len(right), "a sum")
        elif operator == "%" and isinstance(left, str):
            _check_format(left, printf=True)
            _check_counts(right if isinstance(right, tuple) else (right,))
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) \
                and abs(left) > 1 and right * max(abs(left), 2).bit_length() > MAX_POWER_BITS:
            raise ChatTemplateError(f"chat template: a power past {MAX_POWER_BITS} bits")
        return super().call_binop(context, operator, left, right)


class Deadline:
    """After `seconds`, raise RenderTimeout in the thread that entered (CPython's PyThreadState_SetAsyncExc:
    a render, pure Python, stops at its next bytecode). Leaving the block disarms it."""

    def __init__(self, seconds: float):
        self._thread, self._lock, self._armed, self._fired = threading.get_ident(), threading.Lock(), True, False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> "Deadline":
        self._timer.start()
        return self

    def _fire(self) -> None:
        with self._lock:
            if self._armed:
                self._fired = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread), ctypes.py_object(RenderTimeout))

    def __exit__(self, *exc: Any) -> None:
        self._timer.cancel()
        with self._lock:
            self._armed = False
            if self._fired:  # raised but perhaps not delivered yet: take it back
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread), None)
