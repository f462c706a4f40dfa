"""Batched sampling: one call draws the next token for every sequence in the step.

Steps, in order, each over the whole batch at once:
  1. temperature (greedy rows are left as they are)
  2. top-k
  3. top-p (the smallest nucleus whose mass reaches p)
  4. min-p (drop tokens below min_p × the top probability)
  5. draw by the exponential race (argmax of p / E, E ~ Exp(1)), or argmax for greedy rows.
Steps 2-4 sort the vocabulary, so they run only when some row asks for one of them. Seeded rows
draw their noise from their own generator, so their tokens do not depend on the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling_params import SamplingParams


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [seqs]
    top_k: torch.Tensor  # [seqs], vocab size where unlimited
    top_p: torch.Tensor  # [seqs]
    min_p: torch.Tensor  # [seqs]
    greedy: torch.Tensor  # [seqs] bool
    generators: dict[int, torch.Generator]  # row → generator of seeded rows
    filters: bool  # some row uses top-k, top-p or min-p

    @classmethod
    def build(cls, params: list[SamplingParams], generators: list[torch.Generator | None], vocab_size: int,
              device: torch.device | str) -> "SamplingMetadata":
        def col(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            temperature=col([p.temperature if p.temperature > 0 else 1.0 for p in params], torch.float32),
            top_k=col([p.top_k if p.top_k > 0 else vocab_size for p in params], torch.int64),
            top_p=col([p.top_p for p in params], torch.float32),
            min_p=col([p.min_p for p in params], torch.float32),
            greedy=col([p.greedy for p in params], torch.bool),
            generators={row: g for row, g in enumerate(generators) if g is not None},
            filters=any(0 < p.top_k < vocab_size or p.top_p < 1.0 or p.min_p > 0.0 for p in params),
        )


def apply_top_k_top_p_min_p(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Mask filtered-out tokens with -inf; logits are already divided by temperature."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = ranks >= meta.top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= meta.top_p[:, None]
    drop |= probs < meta.min_p[:, None] * probs[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def exponential_noise(shape: torch.Size, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Exp(1) samples as -log(U): on the CPU ~5x cheaper than Tensor.exponential_ (measured)."""
    return torch.rand(shape, device=device, generator=generator).log_().neg_()


class Sampler:
    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        greedy_tokens = logits.argmax(dim=-1)
        if bool(meta.greedy.all()):
            return greedy_tokens
        logits = logits / meta.temperature[:, None]
        if meta.filters:
            logits = apply_top_k_top_p_min_p(logits, meta)
        probs = logits.softmax(dim=-1)
        noise = exponential_noise(probs.shape, probs.device)
        for row, generator in meta.generators.items():
            noise[row] = exponential_noise(probs.shape[1:], probs.device, generator)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(meta.greedy, greedy_tokens, sampled)
