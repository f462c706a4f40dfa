"""LFM2's gated short convolution, a layer mixer with a fixed-size state per sequence.

in_proj gives B, C and x; B·x runs through a depthwise causal convolution of `conv_kernel` taps whose
last taps − 1 inputs each sequence keeps between steps (its state: chunked prefill and decode continue
from it); C times the convolution goes through out_proj. Like llama.cpp's `lfm2` and transformers' Lfm2ShortConv.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..distributed import RankRows, span
from .linear import LinearPlan
from .recurrent_state import StateMetadata, causal_conv


class ShortConv(nn.Module):
    """Under tensor parallelism each rank holds a span of the channels: its rows of B, C and x, of the
    convolution and its state, and the matching input columns of out_proj (the ranks sum its products)."""

    def __init__(self, cfg: ModelConfig, plan: LinearPlan, prefix: str):
        super().__init__()
        hidden = cfg.hidden_size
        first, channels = span(hidden, plan.tp)
        rows = RankRows.span(first, channels, hidden)
        self.in_proj = plan.linear(prefix, {"in_proj": 3 * channels}, hidden, bias=cfg.conv_bias, parallel="column",
                                   rank_slices=(RankRows.concat(rows, rows, rows),))
        self.out_proj = plan.linear(prefix, {"out_proj": hidden}, channels, bias=cfg.conv_bias, parallel="row",
                                    rank_slices=(rows,))
        # The checkpoint's depthwise convolution (its weight [channels, 1, taps]); run by causal_conv.
        self.conv = nn.Conv1d(channels, channels, cfg.conv_kernel, groups=channels, bias=cfg.conv_bias)
        if plan.tp is not None and plan.tp.size > 1:
            for param in self.conv.parameters():
                param.rank_rows = rows

    def forward(self, x: torch.Tensor, states: tuple[torch.Tensor, ...], meta: StateMetadata) -> torch.Tensor:
        """x [tokens, hidden] of the step's sequences (meta's order); states: ([slots, taps − 1, hidden],)."""
        b, c, h = self.in_proj(x).chunk(3, dim=-1)
        conv = causal_conv(b * h, self.conv.weight[:, 0], self.conv.bias, states[0], meta)
        return self.out_proj(c * conv)
