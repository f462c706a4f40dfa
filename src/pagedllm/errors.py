"""User-facing errors. Front ends print these as one line; anything else is a bug."""


class PagedLLMError(Exception):
    """An error caused by input from outside (a file, a flag, a request) with a clear message."""


class ModelSourceError(PagedLLMError, ValueError):
    """A --model argument that names nothing pagedllm can load."""


class ConfigError(PagedLLMError, ValueError):
    """A configuration value (from a model file or a flag) outside what pagedllm accepts."""


def shown(value: object, limit: int = 60) -> str:
    """A value from outside in an error message, cut short: the message stays one short line whatever was sent."""
    if isinstance(value, int) and abs(value) >= 10**limit:
        return "a larger integer"  # (and repr of one over 4,300 digits raises)
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"
