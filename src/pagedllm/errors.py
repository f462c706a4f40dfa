"""User-facing errors. Front ends print these as one line; anything else is a bug."""


class PagedLLMError(Exception):
    """An error caused by input from outside (a file, a flag, a request) with a clear message."""


class ModelSourceError(PagedLLMError, ValueError):
    """A --model argument that names nothing pagedllm can load."""


class ConfigError(PagedLLMError, ValueError):
    """A configuration value (from a model file or a flag) outside what pagedllm accepts."""
