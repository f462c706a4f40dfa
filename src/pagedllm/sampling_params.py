"""SamplingParams: what a request asks of generation, validated at construction.

Names and defaults follow vLLM and OpenAI (temperature 1.0; 0 means greedy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import PagedLLMError


class SamplingParamsError(PagedLLMError, ValueError):
    """An invalid sampling parameter; the message names it."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no limit
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "an integer >= 1", self.max_tokens)
        _check(_is_number(self.temperature) and 0 <= self.temperature <= 100, "temperature", "a number in [0, 100]",
               self.temperature)
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]", self.top_p)
        _check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", "-1, 0 or a positive integer", self.top_k)
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "a number in [0, 1]", self.min_p)
        _check(self.seed is None or isinstance(self.seed, int), "seed", "an integer", self.seed)
        stop_ids = tuple(self.stop_token_ids)
        _check(all(isinstance(i, int) and i >= 0 for i in stop_ids), "stop_token_ids", "non-negative integers", stop_ids)
        object.__setattr__(self, "stop_token_ids", stop_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _check(ok: bool, name: str, expected: str, value: object) -> None:
    if not ok:
        raise SamplingParamsError(f"{name} must be {expected}, got {value!r}")
