"""Every rotary layout runs as rotate-half over the whole head once each head's q/k rows are
reordered (layers/rotary.py): partial and interleaved rotations against their direct forms."""

from __future__ import annotations

import pytest
import torch

from pagedllm.layers.rotary import apply_rope, padded_inv_freq, rope_cos_sin, rope_inv_freq, rotate_half_order


def _direct(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, interleaved: bool) -> torch.Tensor:
    """The checkpoint's own rotation: pairs (2i, 2i+1) or (i, i + rotary_dim/2) of the first dims; the rest pass."""
    angles = positions.float()[:, None] * rope_inv_freq(rotary_dim, 10000.0, None)  # [tokens, rotary_dim / 2]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    a, b = (rot[..., 0::2], rot[..., 1::2]) if interleaved else rot.chunk(2, dim=-1)
    a, b = a * cos - b * sin, b * cos + a * sin
    rot = torch.stack((a, b), dim=-1).flatten(-2) if interleaved else torch.cat((a, b), dim=-1)
    return torch.cat((rot, rest), dim=-1)


@pytest.mark.parametrize("head_dim,rotary_dim", [(16, 16), (32, 16), (32, 8), (64, 32)])
@pytest.mark.parametrize("interleaved", [False, True])
def test_reordered_rows_rotate_as_the_checkpoint(head_dim, rotary_dim, interleaved):
    positions = torch.arange(7) * 5
    x = torch.randn(7, 3, head_dim, generator=torch.Generator().manual_seed(head_dim + rotary_dim))
    order = rotate_half_order(head_dim, rotary_dim, interleaved)
    assert sorted(order) == list(range(head_dim))
    inv_freq = padded_inv_freq(rope_inv_freq(rotary_dim, 10000.0, None), head_dim)
    cos, sin = rope_cos_sin(positions, inv_freq, torch.float32)
    ours = apply_rope(x[..., order], cos, sin)
    torch.testing.assert_close(ours, _direct(x, positions, rotary_dim, interleaved)[..., order], atol=1e-5, rtol=1e-5)
    # q·k, what attention reads, is the same in either layout
    q, k = ours[:, 0], ours[-1:, 1]
    torch.testing.assert_close(q @ k.T, _direct(x, positions, rotary_dim, interleaved)[:, 0]
                               @ _direct(x, positions, rotary_dim, interleaved)[-1:, 1].T, atol=1e-4, rtol=1e-4)
