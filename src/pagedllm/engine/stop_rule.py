"""The one rule that ends a sequence on a token: sampled sequences (the scheduler's update) and searches'
candidates (engine/search.py) both ask it. Stop strings are text: the client finds those."""

from __future__ import annotations

from dataclasses import dataclass

from ..sampling_params import SamplingParams
from .sequence import SequenceStatus


@dataclass(frozen=True)
class StopRule:
    eos_token_ids: frozenset[int]  # the tokenizer's
    max_model_len: int

    def stop_ids(self, params: SamplingParams) -> frozenset[int]:
        """The tokens that end a sequence once min_tokens are out: EOS (unless ignore_eos), stop_token_ids."""
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        return eos | frozenset(params.stop_token_ids)

    def is_stop_token(self, params: SamplingParams, token: int) -> bool:
        return (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids

    def max_output(self, params: SamplingParams, prompt_len: int) -> int:
        """max_tokens, or fewer where the model's context ends first."""
        return min(params.max_tokens, self.max_model_len - prompt_len)

    def status(self, params: SamplingParams, prompt_len: int, output_len: int, token: int) -> SequenceStatus | None:
        """How a sequence of `output_len` generated tokens ending in `token` ends, None if it goes on."""
        if output_len >= params.min_tokens and self.is_stop_token(params, token):
            return SequenceStatus.FINISHED_STOPPED
        if output_len >= self.max_output(params, prompt_len):
            return SequenceStatus.FINISHED_LENGTH
        return None

    def stop_reason(self, params: SamplingParams, token: int) -> int | None:
        """The stop token id reported for a sequence ended by `token`: one of stop_token_ids that is not EOS."""
        is_eos = token in self.eos_token_ids and not params.ignore_eos
        return token if token in params.stop_token_ids and not is_eos else None
