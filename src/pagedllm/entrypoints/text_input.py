"""Text from outside must be Unicode that UTF-8 can carry: JSON's \\udXXX escapes can spell a lone UTF-16
surrogate, on which the tokenizer and every response fail. Request bodies and batch rows are walked once,
when they arrive, and refused naming the field."""

from __future__ import annotations

from typing import Any

LONE_SURROGATE = "the text holds a lone UTF-16 surrogate, which is not valid Unicode"


def lone_surrogate_at(data: Any) -> str | None:
    """The path ("messages.0.content") of a string in `data` that UTF-8 cannot carry, None if none.
    JSON's \\udXXX escapes can spell a lone UTF-16 surrogate; the tokenizer and every response would fail on it.
    Iterative: a body nested deeper than Python's stack is still walked."""
    stack: list[tuple[str, object, Any]] = [("", None, data)]  # (parent's path, key, value)
    while stack:
        parent, key, value = stack.pop()
        if isinstance(value, str):
            if not _encodable(value):
                return _joined(parent, key) or "body"
        elif isinstance(value, dict):
            path = _joined(parent, key)
            for name, item in value.items():
                if isinstance(name, str) and not _encodable(name):
                    return _joined(path, name)
                if isinstance(item, (str, dict, list)):
                    stack.append((path, name, item))
        elif isinstance(value, list):
            path = _joined(parent, key)
            stack += [(path, i, item) for i, item in enumerate(value) if isinstance(item, (str, dict, list))]
    return None


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _joined(path: str, key: object) -> str:
    """path.key, the key cut short and made printable: paths go into error messages."""
    if key is None:
        return path
    part = str(key)[:40].encode("utf-8", "backslashreplace").decode("utf-8")
    return f"{path}.{part}" if path else part
