"""SamplingParams: what a request asks of generation, validated at construction.

Names, defaults and ranges follow vLLM and OpenAI (temperature 1.0; 0 means greedy). The logits
pipeline applies them in this order: repetition / presence / frequency penalties, logit_bias and
min_tokens masks (and a structured-output grammar's mask), temperature, top-k, top-p, min-p (see
sampling/sampler.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import PagedLLMError
from .sampling.structured_output import StructuredOutputParams

MAX_LOGPROBS = 20  # top-N alternatives per position, as OpenAI allows


class SamplingParamsError(PagedLLMError, ValueError):
    """An invalid sampling parameter; the message names it."""


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions returned
    best_of: int | None = None  # completions generated (>= n); the n with the highest cumulative logprob are returned
    max_tokens: int = 16
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens are generated
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no limit
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output (HF / CTRL rule)
    presence_penalty: float = 0.0  # subtracted once from each token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> bias added to its logit
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)  # strings that end generation; never part of the text
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None  # log-probabilities of the sampled token and the top-N alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    skip_special_tokens: bool = True
    timeout: float | None = None  # seconds after arrival; then the request finishes with reason "timeout"
    structured_output: StructuredOutputParams | None = None  # JSON schema, regex or choice, enforced by a mask

    def __post_init__(self) -> None:
        _check(_is_int(self.n) and self.n >= 1, "n", "an integer >= 1", self.n)
        _check(self.best_of is None or (_is_int(self.best_of) and self.best_of >= self.n), "best_of",
               f"an integer >= n ({self.n})", self.best_of)
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an integer >= 1", self.max_tokens)
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
               f"an integer in [0, max_tokens={self.max_tokens}]", self.min_tokens)
        _check(_is_number(self.temperature) and 0 <= self.temperature <= 100, "temperature", "a number in [0, 100]",
               self.temperature)
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]", self.top_p)
        _check(_is_int(self.top_k) and self.top_k >= -1, "top_k", "-1, 0 or a positive integer", self.top_k)
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "a number in [0, 1]", self.min_p)
        _check(_is_number(self.repetition_penalty) and 0 < self.repetition_penalty <= 10, "repetition_penalty",
               "a number in (0, 10]", self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            _check(_is_number(getattr(self, name)) and -2 <= getattr(self, name) <= 2, name, "a number in [-2, 2]",
                   getattr(self, name))
        self._normalise_logit_bias()
        _check(self.seed is None or _is_int(self.seed), "seed", "an integer", self.seed)
        self._normalise_stops()
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS), name,
                   f"an integer in [0, {MAX_LOGPROBS}]", value)
        _check(self.timeout is None or (_is_number(self.timeout) and self.timeout > 0), "timeout",
               "a positive number of seconds", self.timeout)
        _check(self.structured_output is None or isinstance(self.structured_output, StructuredOutputParams),
               "structured_output", "a StructuredOutputParams", self.structured_output)

    def _normalise_logit_bias(self) -> None:
        bias = self.logit_bias
        _check(isinstance(bias, Mapping), "logit_bias", "a mapping of token id to bias", bias)
        try:
            clean = {int(k): float(v) for k, v in bias.items()}  # JSON keys arrive as strings
        except (TypeError, ValueError):
            raise SamplingParamsError(f"logit_bias must map token ids to numbers, got {bias!r}") from None
        _check(all(k >= 0 for k in clean), "logit_bias", "keyed by non-negative token ids", bias)
        _check(all(-100 <= v <= 100 for v in clean.values()), "logit_bias", "values in [-100, 100]", bias)
        object.__setattr__(self, "logit_bias", clean)

    def _normalise_stops(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        _check(all(isinstance(s, str) and s for s in stop), "stop", "non-empty strings", stop)
        object.__setattr__(self, "stop", stop)
        stop_ids = tuple(self.stop_token_ids or ())
        _check(all(_is_int(i) and i >= 0 for i in stop_ids), "stop_token_ids", "non-negative integers", stop_ids)
        object.__setattr__(self, "stop_token_ids", stop_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def num_sequences(self) -> int:
        """How many sequences the request generates (best_of, else n)."""
        return self.best_of or self.n

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _check(ok: bool, name: str, expected: str, value: object) -> None:
    if not ok:
        raise SamplingParamsError(f"{name} must be {expected}, got {value!r}")
