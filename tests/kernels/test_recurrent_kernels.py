"""The recurrent layers' C++ kernels (kernels/recurrent_layers.cpp) on every instruction-set path this CPU
runs, against the torch forms in layers/: the causal convolution with its state over uneven chunks, and
Gated DeltaNet's decode step (convolution, l2 norms, delta rule, gated norm) in both value-head orders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pagedllm import kernels
from pagedllm.layers.gated_delta_net import _l2_normalised, _recurrent_step
from pagedllm.layers.recurrent_state import StateMetadata

ISAS = kernels.available_isas() if kernels.quant_kernels_available() else ()
pytestmark = pytest.mark.skipif(not ISAS, reason="the CPU kernels did not build")


def _conv_reference(x, weight, history, silu):
    """One sequence: its inputs after its remembered ones, each output the taps' products."""
    taps = weight.shape[1]
    rows = torch.cat([history, x])
    out = torch.stack([(rows[t:t + taps] * weight.T).sum(0) for t in range(len(x))])
    return (F.silu(out) if silu else out), rows[-(taps - 1):]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("silu", [False, True])
def test_causal_conv_matches_per_sequence_reference(isa, silu):
    """Three sequences (one fresh, one of a single token, one longer than the taps) in their slots."""
    gen = torch.Generator().manual_seed(0)
    channels, taps, counts = 40, 4, [5, 1, 2]
    weight = torch.randn(channels, taps, generator=gen)
    state = torch.randn(6, taps - 1, channels, generator=gen)
    slots, fresh = np.array([4, 0, 2]), np.array([False, False, True])
    before = state.clone()
    x = torch.randn(sum(counts), channels, generator=gen)
    meta = StateMetadata.build(np.where(fresh, 0, 9), np.array(counts), slots, "cpu")
    out = kernels.causal_conv(x, weight, None, state, meta.slots, meta.fresh, meta.query_start, silu, isa=isa)
    for s, rows in enumerate(x.split(counts)):
        history = torch.zeros(taps - 1, channels) if fresh[s] else before[slots[s]]
        want, last = _conv_reference(rows, weight, history, silu)
        torch.testing.assert_close(out[meta.query_start[s]:meta.query_start[s + 1]], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state[slots[s]], last)
    torch.testing.assert_close(state[[1, 3, 5]], before[[1, 3, 5]])  # other slots untouched


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("tiled", [False, True])
def test_delta_net_decode_step_matches_torch(isa, tiled):
    gen = torch.Generator().manual_seed(1)
    seqs, key_heads, value_heads, dk, dv, taps = 3, 2, 4, 16, 32, 4
    keys, values = key_heads * dk, value_heads * dv
    channels = 2 * keys + values
    proj = torch.randn(seqs, channels + values + 2 * value_heads, generator=gen)
    weight = torch.randn(channels, taps, generator=gen) * 0.5
    a_log, dt_bias = torch.rand(value_heads, generator=gen) * 2, torch.randn(value_heads, generator=gen)
    norm_weight, eps = torch.randn(dv, generator=gen), 1e-6
    conv_state = torch.randn(5, taps - 1, channels, generator=gen)
    matrices = torch.randn(5, value_heads, dk, dv, generator=gen) * 0.1
    slots, fresh = torch.tensor([3, 0, 1]), torch.tensor([False, True, False])
    conv_before, matrices_before = conv_state.clone(), matrices.clone()
    out = kernels.delta_net_decode(proj, weight, a_log, dt_bias, norm_weight, eps, conv_state, matrices, slots, fresh,
                                   key_heads, tiled, isa=isa)

    history = conv_before[slots].masked_fill(fresh[:, None, None], 0)
    mixed = F.silu((torch.cat([history, proj[:, None, :channels]], 1) * weight.T).sum(1))
    q, k, v = mixed.split([keys, keys, values], -1)
    z, b, a = proj[:, channels:].split([values, value_heads, value_heads], -1)
    per_head = (lambda t: t.repeat(1, value_heads // key_heads, 1)) if tiled else \
        (lambda t: t.repeat_interleave(value_heads // key_heads, 1))
    q = per_head(_l2_normalised(q.view(seqs, key_heads, dk))) * dk**-0.5
    k = per_head(_l2_normalised(k.view(seqs, key_heads, dk)))
    g = -a_log.exp() * F.softplus(a + dt_bias)
    state = matrices_before[slots].masked_fill(fresh[:, None, None, None], 0)
    o, state = _recurrent_step(q, k, v.view(seqs, value_heads, dv), g, torch.sigmoid(b), state)
    want = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps) * norm_weight * F.silu(z.view(seqs, value_heads, dv))
    torch.testing.assert_close(out, want.reshape(seqs, -1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(matrices[slots], state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv_state[slots], torch.cat([history, proj[:, None, :channels]], 1)[:, 1:])
    torch.testing.assert_close(matrices[[2, 4]], matrices_before[[2, 4]])
