"""Prompt-lookup (n-gram) drafts: if the last n tokens appeared before, guess that what followed
them then follows them now. Costs no model; pays off when the output copies the input (code
editing, summaries with quotes, retrieval answers)."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..engine.sequence import Sequence


class NgramProposer:
    def __init__(self, num_tokens: int, max_ngram: int = 4, min_ngram: int = 1):
        self.num_tokens, self.max_ngram, self.min_ngram = num_tokens, max_ngram, min_ngram

    def propose_for(self, sequences: list[Sequence], limits: list[int]) -> list[list[int]]:
        return [self.propose(r.all_token_ids, limit) for r, limit in zip(sequences, limits)]

    def propose(self, token_ids: list[int], limit: int) -> list[int]:
        """Up to min(num_tokens, limit) tokens that followed the latest earlier match of the
        longest suffix (max_ngram down to min_ngram tokens); [] when there is none."""
        count = min(self.num_tokens, limit)
        if count <= 0 or len(token_ids) < self.min_ngram + 1:
            return []
        ids = np.asarray(token_ids)
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            windows = sliding_window_view(ids[:-1], n)  # earlier n-grams, not the suffix itself
            starts = np.flatnonzero((windows == ids[-n:]).all(axis=1))
            if starts.size:
                follow = starts[-1] + n
                return ids[follow:follow + count].tolist()
        return []
