"""SamplingParams: what a request asks of generation, validated at construction.

Names, defaults and ranges follow vLLM and OpenAI (temperature 1.0; 0 means greedy). The logits
pipeline applies them in this order: repetition / presence / frequency penalties, logit_bias and
min_tokens masks (and a structured-output grammar's mask), temperature, top-k, top-p, min-p (see
sampling/sampler.py).

Two deterministic search strategies replace sampling (engine/search.py): beam search
(`use_beam_search`, width = best_of or n, `length_penalty`, `early_stopping`, and diverse beam
search with `num_beam_groups` and `diversity_penalty`), and contrastive search (`penalty_alpha`
> 0 with `top_k` candidates). Names and semantics follow vLLM v0 and Hugging Face transformers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import PagedLLMError, shown

MAX_LOGPROBS = 20  # top-N alternatives per position, as OpenAI allows
MAX_COUNT = 2**31 - 1  # the largest n, best_of, max_tokens, top_k or token id taken (they become int32/64 tensors)
GREEDY_BELOW = 1e-5  # a temperature this small samples greedily (vLLM's rule): dividing by it would overflow
MIN_REPETITION_PENALTY = 0.01  # below it, dividing logits by the penalty overflows to inf (NaN probabilities)


class StructuredOutputError(PagedLLMError, ValueError):
    """A schema, regex or choice list that cannot be compiled; the message names the problem."""


@dataclass(frozen=True)
class StructuredOutputParams:
    """Exactly one of: json (a JSON schema, as a dict or a string), json_object (any JSON object),
    regex, choice (the output is one of these strings), grammar (a Lark grammar in llguidance's
    dialect, which may embed JSON schemas with `%json {...}`; tool calls are enforced with one)."""

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise StructuredOutputError(f"structured output takes exactly one of json, json_object, regex, choice, "
                                        f"grammar; got {', '.join(given) or 'none'}")
        if self.choice is not None:
            choice = tuple(self.choice)
            if not choice or not all(isinstance(c, str) and c for c in choice):
                raise StructuredOutputError("structured output choice must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", choice)
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise StructuredOutputError(f"structured output {name} must be a string")


class SamplingParamsError(PagedLLMError, ValueError):
    """An invalid sampling parameter; the message names it (and `param`, where one is known)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


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
    use_beam_search: bool = False  # beam width = best_of (or n); the n best finished beams are returned
    length_penalty: float = 1.0  # beam score = sum of logprobs / length ** length_penalty
    early_stopping: bool | str = False  # True, False (transformers' heuristic) or "never"
    num_beam_groups: int = 1  # diverse beam search: the beams split into this many groups ...
    diversity_penalty: float = 0.0  # ... each penalised for tokens the groups before it chose this step
    penalty_alpha: float = 0.0  # > 0: contrastive search among top_k candidates (degeneration penalty weight)

    def __post_init__(self) -> None:
        _check(_is_int(self.n) and 1 <= self.n <= MAX_COUNT, "n", f"an integer in [1, {MAX_COUNT}]", self.n)
        _check(self.best_of is None or (_is_int(self.best_of) and self.n <= self.best_of <= MAX_COUNT), "best_of",
               f"an integer in [n ({self.n}), {MAX_COUNT}]", self.best_of)
        _check(_is_int(self.max_tokens) and 1 <= self.max_tokens <= MAX_COUNT, "max_tokens",
               f"an integer in [1, {MAX_COUNT}]", self.max_tokens)
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
               f"an integer in [0, max_tokens={self.max_tokens}]", self.min_tokens)
        _check(_is_number(self.temperature) and 0 <= self.temperature <= 100, "temperature", "a number in [0, 100]",
               self.temperature)
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]", self.top_p)
        _check(_is_int(self.top_k) and -1 <= self.top_k <= MAX_COUNT, "top_k",
               f"-1, 0 or a positive integer up to {MAX_COUNT}", self.top_k)
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "a number in [0, 1]", self.min_p)
        _check(_is_number(self.repetition_penalty) and MIN_REPETITION_PENALTY <= self.repetition_penalty <= 10,
               "repetition_penalty", f"a number in [{MIN_REPETITION_PENALTY}, 10]", self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            _check(_is_number(getattr(self, name)) and -2 <= getattr(self, name) <= 2, name, "a number in [-2, 2]",
                   getattr(self, name))
        self._normalise_logit_bias()
        _check(self.seed is None or (_is_int(self.seed) and -2**63 <= self.seed < 2**64), "seed",
               "a 64-bit integer", self.seed)
        self._normalise_stops()
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS), name,
                   f"an integer in [0, {MAX_LOGPROBS}]", value)
        _check(self.timeout is None or (_is_number(self.timeout) and self.timeout > 0), "timeout",
               "a positive number of seconds", self.timeout)
        _check(self.structured_output is None or isinstance(self.structured_output, StructuredOutputParams),
               "structured_output", "a StructuredOutputParams", self.structured_output)
        self._check_search()

    def _check_search(self) -> None:
        _check(isinstance(self.use_beam_search, bool), "use_beam_search", "a boolean", self.use_beam_search)
        _check(_is_number(self.length_penalty) and -10 <= self.length_penalty <= 10, "length_penalty",
               "a number in [-10, 10]", self.length_penalty)
        _check(isinstance(self.early_stopping, bool) or self.early_stopping == "never", "early_stopping",
               'True, False or "never"', self.early_stopping)
        _check(_is_int(self.num_beam_groups) and self.num_beam_groups >= 1
               and self.num_sequences % self.num_beam_groups == 0, "num_beam_groups",
               f"a positive divisor of the beam width ({self.num_sequences})", self.num_beam_groups)
        _check(_is_number(self.diversity_penalty) and self.diversity_penalty >= 0, "diversity_penalty",
               "a number >= 0", self.diversity_penalty)
        _check(_is_number(self.penalty_alpha) and 0 <= self.penalty_alpha <= 1, "penalty_alpha",
               "a number in [0, 1]", self.penalty_alpha)
        if not self.use_beam_search:
            for name, default in (("length_penalty", 1.0), ("early_stopping", False), ("num_beam_groups", 1),
                                  ("diversity_penalty", 0.0)):
                _check(getattr(self, name) == default, name, "left at its default unless use_beam_search is set",
                       getattr(self, name))
        if self.search is None:
            return
        _check(self.greedy, "temperature", f"0 with {self.search} (it is deterministic)",
               self.temperature)
        _check(not (self.use_beam_search and self.penalty_alpha), "penalty_alpha", "0 with beam search",
               self.penalty_alpha)
        if self.penalty_alpha:
            _check(_is_int(self.top_k) and self.top_k > 1, "top_k", "an integer > 1 (the candidates) with penalty_alpha",
                   self.top_k)
            _check(self.num_sequences == 1, "n", "1 with contrastive search", self.n)
        elif self.top_k not in (-1, 0):
            raise SamplingParamsError("top_k must be -1 with beam search")
        unsupported = {"top_p": self.top_p != 1.0, "min_p": self.min_p != 0.0, "logit_bias": bool(self.logit_bias),
                       "repetition_penalty": self.repetition_penalty != 1.0,
                       "presence_penalty": self.presence_penalty != 0.0,
                       "frequency_penalty": self.frequency_penalty != 0.0, "stop": bool(self.stop),
                       "logprobs": self.logprobs is not None, "structured_output": self.structured_output is not None}
        for name, used in unsupported.items():
            if used:
                raise SamplingParamsError(f"{name} is not supported with {self.search}")

    def _normalise_logit_bias(self) -> None:
        bias = self.logit_bias
        _check(isinstance(bias, Mapping), "logit_bias", "a mapping of token id to bias", bias)
        try:
            clean = {int(k): float(v) for k, v in bias.items()}  # JSON keys arrive as strings
        except (TypeError, ValueError):
            raise SamplingParamsError(f"logit_bias must map token ids to numbers, got {shown(bias)}", "logit_bias") from None
        _check(all(0 <= k <= MAX_COUNT for k in clean), "logit_bias", "keyed by token ids (non-negative integers)",
               bias)
        _check(all(-100 <= v <= 100 for v in clean.values()), "logit_bias", "values in [-100, 100]", bias)
        object.__setattr__(self, "logit_bias", clean)

    def _normalise_stops(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        _check(all(isinstance(s, str) and s for s in stop), "stop", "non-empty strings", stop)
        object.__setattr__(self, "stop", stop)
        stop_ids = tuple(self.stop_token_ids or ())
        _check(all(_is_int(i) and 0 <= i <= MAX_COUNT for i in stop_ids), "stop_token_ids",
               "token ids (non-negative integers)", stop_ids)
        object.__setattr__(self, "stop_token_ids", stop_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def search(self) -> str | None:
        """The search strategy that replaces sampling, if any."""
        if self.use_beam_search:
            return "beam search"
        return "contrastive search" if self.penalty_alpha > 0 else None

    @property
    def num_sequences(self) -> int:
        """How many sequences the request generates (best_of, else n)."""
        return self.best_of or self.n

    @property
    def reports_logprobs(self) -> bool:
        """Whether sampled tokens' logprob rows go out: asked for, or best_of ranks the sequences by them."""
        return self.logprobs is not None or self.num_sequences > self.n

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A finite int or float (NaN and the infinities are not numbers any parameter takes)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def _check(ok: bool, name: str, expected: str, value: object) -> None:
    if not ok:
        raise SamplingParamsError(f"{name} must be {expected}, got {shown(value)}", name)
