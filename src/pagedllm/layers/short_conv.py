"""LFM2's gated short convolution, a layer mixer with a fixed-size state per sequence.

in_proj gives B, C and x; B·x runs through a depthwise causal convolution of `conv_kernel` taps whose
last taps − 1 inputs each sequence keeps between steps (its state: chunked prefill and decode continue
from it); C times the convolution goes through out_proj. Like llama.cpp's `lfm2` and transformers' Lfm2ShortConv.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .linear import LinearPlan
from .recurrent_state import StateMetadata, causal_conv


class ShortConv(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: LinearPlan, prefix: str):
        super().__init__()
        hidden = cfg.hidden_size
        self.in_proj = plan.linear(prefix, {"in_proj": 3 * hidden}, hidden, bias=cfg.conv_bias)
        self.out_proj = plan.linear(prefix, {"out_proj": hidden}, hidden, bias=cfg.conv_bias)
        # The checkpoint's depthwise convolution (its weight [hidden, 1, taps]); run by causal_conv.
        self.conv = nn.Conv1d(hidden, hidden, cfg.conv_kernel, groups=hidden, bias=cfg.conv_bias)

    def forward(self, x: torch.Tensor, states: tuple[torch.Tensor, ...], meta: StateMetadata) -> torch.Tensor:
        """x [tokens, hidden] of the step's sequences (meta's order); states: ([slots, taps − 1, hidden],)."""
        b, c, h = self.in_proj(x).chunk(3, dim=-1)
        conv = causal_conv(b * h, self.conv.weight[:, 0], self.conv.bias, states[0], meta)
        return self.out_proj(c * conv)
