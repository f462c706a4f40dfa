"""Structured output: JSON (a schema, or any object), a regular expression, a fixed list of
choices or a Lark grammar, enforced by a token mask from llguidance.

Why llguidance: it computes a mask over a 50k-token vocabulary in ~1 ms on the CPU without a
precompilation step per grammar, handles JSON schema, regex and Lark, has no dependencies beyond
its Rust core, and takes a Hugging Face `tokenizers` JSON directly (so GGUF vocabularies work).
"""

from __future__ import annotations

import json

import torch

from ..sampling_params import StructuredOutputError, StructuredOutputParams
from ..tokenizer import Tokenizer
from .grammar_bounds import check_grammar_bounds
from .grammar_sandbox import GrammarSandbox

MAX_ERROR_CHARS = 300  # a compiler's message is cut here: one line, whatever the grammar was


def grammar_for(params: StructuredOutputParams) -> str:
    """The llguidance grammar that enforces `params` (refused first if it nests past the bounds)."""
    from llguidance import LLMatcher

    check_grammar_bounds(params)
    if params.regex is not None:
        return LLMatcher.grammar_from_regex(ascii_digits(params.regex))
    if params.choice is not None:
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in params.choice))
    if params.grammar is not None:
        return LLMatcher.grammar_from_lark(params.grammar)
    schema = {"type": "object"} if params.json_object else params.json
    try:  # compact JSON unless the schema's "x-guidance" says otherwise: it always fits and parses
        return LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    except (ValueError, TypeError) as exc:
        raise StructuredOutputError(f"structured output json schema: {exc}") from None


def ascii_digits(regex: str) -> str:
    r"""`\d` as [0-9]: the grammar's regex engine is Unicode-aware, and users mean ASCII digits."""
    out, in_class, i = [], False, 0
    while i < len(regex):
        if regex.startswith("\\d", i):
            out.append("0-9" if in_class else "[0-9]")
            i += 2
            continue
        if regex[i] == "\\":
            out.append(regex[i:i + 2])
            i += 2
            continue
        if regex[i] in "[]":
            in_class = regex[i] == "["
        out.append(regex[i])
        i += 1
    return "".join(out)


def compiler_error(text: str) -> str:
    """llguidance's message on one line: its first line and the "error:" line that says what is wrong."""
    lines = text.splitlines() or [""]
    detail = next((line[len("error:"):].strip() for line in lines[1:] if line.startswith("error:")), "")
    message = f"{lines[0].rstrip()} {detail}".strip()
    return message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS] + "…"


class GrammarCompiler:
    """Builds matchers for one tokenizer. The llguidance tokenizer (~0.3 s) is built on the first
    structured request, so engines that never see one do not pay for it."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self._tokenizer, self.vocab_size = tokenizer, vocab_size
        self._ll_tokenizer = None
        self.sandbox: GrammarSandbox | None = None

    def matcher(self, params: StructuredOutputParams):
        """A matcher for `params`, its grammar compiled first in the sandbox (a crash there refuses it)."""
        from llguidance import LLMatcher, LLTokenizer

        if self._ll_tokenizer is None:
            tokenizer_json, eos = self._tokenizer.backend.to_str(), sorted(self._tokenizer.stop_token_ids)
            self._ll_tokenizer = LLTokenizer(tokenizer_json, eos_token=eos)
            self.sandbox = GrammarSandbox(tokenizer_json, eos)
        grammar = grammar_for(params)
        self.sandbox.check(grammar)
        matcher = LLMatcher(self._ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise StructuredOutputError(f"structured output: {compiler_error(matcher.get_error())}")
        matcher.compute_logit_bias()  # the first mask now: a grammar that matches no text fails here
        if matcher.is_error():
            raise StructuredOutputError("structured output: the grammar matches no text (are there rules that "
                                        "only refer to themselves, or a schema that is only a reference to itself?)")
        return matcher

    def allowed(self, matcher) -> torch.Tensor:
        """[vocab] bool: tokens the grammar allows next (model tokens past the tokenizer's: never)."""
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        allowed = torch.frombuffer(bytearray(matcher.compute_logit_bias()), dtype=torch.uint8) > 0
        size = min(self.vocab_size, allowed.numel())
        mask[:size] = allowed[:size]
        return mask
