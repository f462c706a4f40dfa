"""Search strategies that replace sampling: beam search (diverse groups included) and contrastive search.

Both work over a request's *live sequences*: ordinary Sequences that share KV blocks through forks
(copy-on-write of the partly filled last block). Each engine step every live sequence computes
one token and hands its logits row here (`record`). When all of them have (`ready`), the strategy
`select`s continuations as (parent, token) pairs; the engine then forks a parent that continues
more than once, frees one that does not continue, appends the tokens and hands the new live
sequences back in the same order (`adopt`). An empty selection ends the search.

Semantics follow Hugging Face transformers: `_beam_search` of transformers 5 (candidates,
finished-hypothesis scores sum / length ** length_penalty, the early-stopping heuristic), group
beam search with a Hamming diversity penalty and contrastive search as transformers 4 had them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..sampling_params import SamplingParams
from .sequence import Sequence, SequenceStatus
from .stop_rule import StopRule

NO_SCORE = -1.0e9  # what transformers gives an empty slot


@dataclass
class Hypothesis:
    """A finished sequence the search may return."""

    token_ids: list[int]
    score: float  # what ranks hypotheses (length-penalised for beam search)
    cumulative_logprob: float
    finish_reason: str  # "stop", "length" or "timeout"
    stop_reason: int | None = None  # the stop token id, when one of the request's stop_token_ids ended it


@dataclass
class _Beam:
    sequence: Sequence
    score: float  # the running score (diversity penalties included, as in transformers)
    logprob: float  # the model's log-probability of the generated tokens


class SearchStrategy(ABC):
    """What the engine sees of a search; subclasses hold the strategy's own state."""

    def __init__(self, params: SamplingParams, rule: StopRule, prompt_len: int):
        self.params = params
        self.rule, self.prompt_len = rule, prompt_len  # the stop rule sampled sequences follow too
        self.eos_ids = rule.stop_ids(params)  # EOS (unless ignore_eos) and the request's stop_token_ids
        self.max_tokens = rule.max_output(params, prompt_len)
        self.rows: dict[str, torch.Tensor] = {}  # this step's logits row per live sequence
        self.done = False

    @property
    @abstractmethod
    def live(self) -> list[Sequence]:
        """The sequences the search is advancing."""

    def record(self, sequence: Sequence, logits: torch.Tensor, hidden: torch.Tensor | None) -> None:
        self.rows[sequence.seq_id] = logits.float().clone()

    def ready(self) -> bool:
        """Every live sequence is computed to its last token and has handed in its row."""
        return all(r.seq_id in self.rows and r.status == SequenceStatus.RUNNING
                   and r.num_computed_tokens == r.num_tokens for r in self.live)

    @abstractmethod
    def select(self) -> list[tuple[Sequence, int]]:
        """Continuations (parent, token) for the next step, in order; [] ends the search."""

    @abstractmethod
    def adopt(self, children: list[Sequence]) -> None:
        """The sequences that carry select()'s continuations, in the same order."""

    @abstractmethod
    def results(self, limit: int) -> list[Hypothesis]:
        """The best `limit` finished sequences (the live ones count when the search was cut short)."""

    @abstractmethod
    def max_blocks(self, total_tokens: int, block_size: int) -> int:
        """KV blocks the search may hold at once for sequences of `total_tokens`."""

    def _masked(self, sequence: Sequence) -> torch.Tensor:
        """The row, with stop tokens masked until min_tokens are generated."""
        row = self.rows[sequence.seq_id]
        if len(sequence.output_token_ids) < self.params.min_tokens and self.eos_ids:
            row[list(self.eos_ids)] = float("-inf")
        return row

    def _finish_reason(self, tokens: list[int]) -> tuple[str, int | None]:
        status = self.rule.status(self.params, self.prompt_len, len(tokens), tokens[-1]) if tokens else None
        if status is SequenceStatus.FINISHED_STOPPED:
            return "stop", self.rule.stop_reason(self.params, tokens[-1])
        return "length", None

    def _ends(self, token: int, length: int) -> bool:
        """Whether a sequence of `length` generated tokens ending in `token` is finished."""
        return self.rule.status(self.params, self.prompt_len, length, token) is not None


class BeamSearch(SearchStrategy):
    """Beam search; with num_beam_groups > 1, diverse beam search (each group is a beam search of
    width / groups beams whose scores lose diversity_penalty per use of a token by an earlier group
    in the same step). The n best finished hypotheses of all groups are returned."""

    def __init__(self, root: Sequence, params: SamplingParams, rule: StopRule):
        super().__init__(params, rule, len(root.prompt_token_ids))
        groups = params.num_beam_groups
        self.group_size = params.num_sequences // groups
        self.keep = max(2, 1 + len(self.eos_ids)) * self.group_size  # candidates per step (transformers' rule)
        self.beams: list[list[_Beam]] = [[_Beam(root, 0.0, 0.0)] for _ in range(groups)]
        self.finished: list[list[Hypothesis]] = [[] for _ in range(groups)]
        self.improvable = [True] * groups  # transformers' early-stopping heuristic, per group
        self._pending: list[tuple[int, float, float]] = []  # (group, score, logprob) per continuation

    @property
    def live(self) -> list[Sequence]:
        unique = {b.sequence.seq_id: b.sequence for group in self.beams for b in group}
        return list(unique.values())

    def select(self) -> list[tuple[Sequence, int]]:
        logprobs = {r.seq_id: torch.log_softmax(self._masked(r), dim=-1) for r in self.live}
        continuations, self._pending, chosen = [], [], []
        for g, beams in enumerate(self.beams):
            if not beams:
                continue
            running = self._step_group(g, self._candidates(beams, logprobs, chosen))
            for score, logprob, beam, token in running:
                continuations.append((beam.sequence, token))
                self._pending.append((g, score, logprob))
                chosen.append(token)
            if not running:
                self.beams[g] = []
        self.rows.clear()
        self.done = not continuations
        return continuations

    def adopt(self, children: list[Sequence]) -> None:
        self.beams = [[] for _ in self.beams]
        for child, (g, score, logprob) in zip(children, self._pending):
            self.beams[g].append(_Beam(child, score, logprob))

    def _candidates(self, beams: list[_Beam], logprobs: dict[str, torch.Tensor],
                    chosen: list[int]) -> list[tuple[float, float, _Beam, int]]:
        """The best `keep` (score, logprob, parent, token) continuations of a group, best first."""
        rows = torch.stack([logprobs[b.sequence.seq_id] for b in beams])
        vocab = rows.shape[-1]
        penalised = rows
        if self.params.diversity_penalty and chosen:
            counts = torch.bincount(torch.tensor(chosen), minlength=vocab).to(rows.dtype)
            penalised = rows - self.params.diversity_penalty * counts
        scores = penalised + torch.tensor([b.score for b in beams])[:, None]
        top = torch.topk(scores.flatten(), min(self.keep, scores.numel()))
        parents, tokens = top.indices // vocab, top.indices % vocab
        raw = rows[parents, tokens].tolist()
        return [(score, beams[p].logprob + lp, beams[p], t)
                for score, lp, p, t in zip(top.values.tolist(), raw, parents.tolist(), tokens.tolist())]

    def _step_group(self, g: int, candidates: list[tuple[float, float, _Beam, int]]):
        """Finish the top candidates that end, keep the best that go on; [] when the group is done."""
        size, penalty, early = self.group_size, self.params.length_penalty, self.params.early_stopping
        length = len(candidates[0][2].sequence.output_token_ids) + 1  # all beams of a group are as long
        full_before = len(self.finished[g]) == size
        running, new = [], []
        for rank, (score, logprob, beam, token) in enumerate(candidates):
            if not self._ends(token, length):
                if len(running) < size:
                    running.append((score, logprob, beam, token))
            elif rank < size and self.improvable[g] and not (early is True and full_before):
                tokens = beam.sequence.output_token_ids + [token]
                new.append(Hypothesis(tokens, score / length ** penalty, logprob, *self._finish_reason(tokens)))
        self.finished[g] = sorted(self.finished[g] + new, key=lambda h: h.score, reverse=True)[:size]
        best_length = self.max_tokens if early == "never" and penalty > 0 else length
        best_possible = (running[0][0] if running else NO_SCORE) / best_length ** penalty
        full = len(self.finished[g]) == size
        worst = self.finished[g][-1].score if full else NO_SCORE
        self.improvable[g] = self.improvable[g] and best_possible > worst
        if not self.improvable[g] or (early is True and full):
            return []
        return running

    def results(self, limit: int) -> list[Hypothesis]:
        found = [h for group in self.finished for h in group]
        if not self.done:  # cut short (timeout): the live beams count as they stand
            found += [Hypothesis(list(b.sequence.output_token_ids), b.score / max(1, len(b.sequence.output_token_ids))
                                 ** self.params.length_penalty, b.logprob, "timeout")
                      for group in self.beams for b in group]
        return sorted(found, key=lambda h: h.score, reverse=True)[:limit]

    def max_blocks(self, total_tokens: int, block_size: int) -> int:
        return self.params.num_sequences * -(-total_tokens // block_size)


class ContrastiveSearch(SearchStrategy):
    """Contrastive search (Su et al. 2022): the top_k candidates of the chosen sequence are each
    computed one token ahead (as forks, in one batch); the next token is the candidate with the
    best (1 - alpha) * probability - alpha * max cosine similarity between its hidden state and
    those of every token before it (prompt included)."""

    def __init__(self, root: Sequence, params: SamplingParams, rule: StopRule):
        super().__init__(params, rule, len(root.prompt_token_ids))
        self.root = root
        self.context: list[torch.Tensor] = []  # final hidden states of the prompt and the chosen tokens
        self.hidden: dict[str, torch.Tensor] = {}  # this step's hidden state per candidate
        self.candidates: list[tuple[Sequence, float]] = []  # live candidates and their probabilities
        self.result: Hypothesis | None = None
        self._probs: list[float] = []
        self._logprob = 0.0

    @property
    def live(self) -> list[Sequence]:
        return [c for c, _ in self.candidates] if self.candidates else [self.root]

    def record_context(self, start: int, hidden: torch.Tensor) -> None:
        """Hidden states of prompt positions start, start + 1, ... (recomputed ones are skipped)."""
        prompt_len = len(self.root.prompt_token_ids)
        first = len(self.context) - start
        if not self.candidates and 0 <= first < hidden.shape[0]:
            self.context += list(hidden[first:prompt_len - start].float())

    def record(self, sequence: Sequence, logits: torch.Tensor, hidden: torch.Tensor | None) -> None:
        super().record(sequence, logits, hidden)
        self.hidden[sequence.seq_id] = hidden.float().clone()

    def select(self) -> list[tuple[Sequence, int]]:
        parent = self._best_candidate() if self.candidates else self.root
        if self.candidates and self._ends(parent.output_token_ids[-1], len(parent.output_token_ids)):
            tokens = list(parent.output_token_ids)
            self.result = Hypothesis(tokens, self._logprob, self._logprob, *self._finish_reason(tokens))
            self.done = True
            return []
        probs = torch.softmax(self._masked(parent), dim=-1)
        top = torch.topk(probs, self.params.top_k)
        self._probs = top.values.tolist()
        self.rows.clear()
        self.hidden.clear()
        return [(parent, t) for t in top.indices.tolist()]

    def _best_candidate(self) -> Sequence:
        sequences = [c for c, _ in self.candidates]
        hidden = torch.stack([self.hidden[r.seq_id] for r in sequences])
        context = torch.stack(self.context)
        similarity = (hidden / hidden.norm(dim=-1, keepdim=True)) @ (context / context.norm(dim=-1, keepdim=True)).T
        probs = torch.tensor([p for _, p in self.candidates])
        alpha = self.params.penalty_alpha
        best = int(((1 - alpha) * probs - alpha * similarity.max(dim=-1).values).argmax())
        self.context.append(hidden[best])
        self._logprob += float(torch.log(probs[best]))
        return sequences[best]

    def adopt(self, children: list[Sequence]) -> None:
        self.candidates = list(zip(children, self._probs))

    def results(self, limit: int) -> list[Hypothesis]:
        if self.result is not None:
            return [self.result]
        path = self.candidates[0][0].output_token_ids[:-1] if self.candidates else []
        return [Hypothesis(list(path), self._logprob, self._logprob, "timeout")]

    def max_blocks(self, total_tokens: int, block_size: int) -> int:
        return -(-total_tokens // block_size) + self.params.top_k


def make_search(root: Sequence, params: SamplingParams, rule: StopRule) -> SearchStrategy:
    strategy = BeamSearch if params.use_beam_search else ContrastiveSearch
    return strategy(root, params, rule)
