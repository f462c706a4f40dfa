"""Rotary position embedding in the Hugging Face ("rotate half") layout.

The frequencies depend on the base and the scaling; cos/sin are computed once per forward for
the batch's positions and shared by every layer. Every layout converts to this one at load:
interleaved pairs and partial rotation (GLM) by reordering each head's q/k rows
(`rotate_half_order`) so that the rotated pairs sit at (i, i + head_dim / 2), with frequency 0 —
cos 1, sin 0, exactly the identity — for the dims that do not rotate.
"""

from __future__ import annotations

import math

import torch

from ..config import RopeScaling


def rope_inv_freq(head_dim: int, base: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.kind in ("freq_factors", "longrope"):  # longrope: the short factors (rope_long_inv_freq: the long)
        return _divided(inv_freq, scaling.freq_factors)
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if scaling.kind == "yarn":
        return _yarn_inv_freq(inv_freq, head_dim, base, scaling)
    raise ValueError(f"unsupported rope scaling {scaling.kind!r}; pagedllm supports linear, llama3, longrope and yarn")


def yarn_mscale(factor: float) -> float:
    """YaRN's attention factor for a context stretched `factor` times (0.1 ln(factor) + 1)."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def _yarn_inv_freq(inv_freq: torch.Tensor, dim: int, base: float, s: RopeScaling) -> torch.Tensor:
    """Interpolated (÷ factor) frequencies for the slow dims, the original ones for the fast dims,
    a linear ramp between: transformers' and llama.cpp's YaRN."""
    def correction_dim(rotations: float) -> float:
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
    return inv_freq / s.factor * ramp + inv_freq * (1 - ramp)


def rope_long_inv_freq(head_dim: int, base: float, scaling: RopeScaling) -> torch.Tensor:
    """LongRoPE's frequencies for sequences past its original context."""
    return _divided(rope_inv_freq(head_dim, base, None), scaling.long_factors)


def _divided(inv_freq: torch.Tensor, factors: tuple[float, ...]) -> torch.Tensor:
    if len(factors) != inv_freq.numel():
        raise ValueError(f"rope: {len(factors)} frequency factors for {inv_freq.numel()} frequencies")
    return inv_freq / torch.tensor(factors, dtype=torch.float32)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def query_temperature(positions: torch.Tensor, beta: float, span: int) -> torch.Tensor:
    """Llama 4's and Ministral 3's long-context query scale: 1 + beta · ln(1 + ⌊position / span⌋) a token (1 within
    the first span positions), float32."""
    return 1 + beta * torch.log1p(torch.floor(positions.float() / span))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype,
                 scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [tokens, 1, head_dim] for the given absolute positions (× `scale`).
    `inv_freq` is [head_dim / 2], or [tokens, head_dim / 2] for frequencies chosen per token."""
    freqs = positions.float()[:, None] * inv_freq.expand(positions.shape[0], -1)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    if scale == 1.0:
        return emb.cos().to(dtype), emb.sin().to(dtype)
    # Only the rotated dims are scaled: the unrotated ones (frequency 0) pass through as they are.
    rotated = (torch.cat((inv_freq, inv_freq), dim=-1) != 0).unsqueeze(-2)  # [1 or tokens, 1, head_dim]
    scale = torch.where(rotated, scale, 1.0)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def padded_inv_freq(inv_freq: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A partial rotation's frequencies over the whole head: 0 (no rotation) past the rotated dims."""
    return torch.cat([inv_freq, inv_freq.new_zeros(head_dim // 2 - inv_freq.shape[-1])], dim=-1)


def rotate_half_order(head_dim: int, rotary_dim: int, interleaved: bool) -> list[int]:
    """The checkpoint dim each position of a head takes, so that the checkpoint's rotated pairs
    ((2i, 2i + 1) interleaved, (i, i + rotary_dim / 2) otherwise) land at (i, i + head_dim / 2)
    and its unrotated dims fill the rest."""
    half = rotary_dim // 2
    if interleaved:
        first, second = list(range(0, rotary_dim, 2)), list(range(1, rotary_dim, 2))
    else:
        first, second = list(range(half)), list(range(half, rotary_dim))
    rest = list(range(rotary_dim, head_dim))
    middle = len(rest) // 2
    return first + rest[:middle] + second + rest[middle:]
