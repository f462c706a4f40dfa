"""The feed-forward block: a gated MLP (SwiGLU, GeGLU) over one fused gate/up product, or a plain one."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..distributed import RankRows, span
from .activation import ACTIVATIONS, gated
from .linear import LinearPlan


class MLP(nn.Module):
    """down(act(gate(x)) · up(x)), or down(act(up(x))) where the model's MLP is not gated (BLOOM);
    `size` is the intermediate width (an expert's own, for MoE)."""

    def __init__(self, cfg: ModelConfig, plan: LinearPlan, prefix: str, size: int | None = None,
                 reduce: bool = True):
        """`reduce`: under tensor parallelism, sum the ranks' partial outputs here (False: the caller
        sums once over several MLPs — the experts of a MoE block)."""
        super().__init__()
        whole = size or cfg.intermediate_size
        first, size = span(whole, plan.tp)  # this rank's share of the intermediate width
        rows = (RankRows.span(first, size, whole),)
        if cfg.gated_mlp:
            self.gate_up_proj = plan.linear(prefix, {"gate_proj": size, "up_proj": size}, cfg.hidden_size,
                                            bias=cfg.mlp_bias, parallel="column", rank_slices=rows * 2)
            self.activation = gated(cfg)
        else:
            self.up_proj = plan.linear(prefix, {"up_proj": size}, cfg.hidden_size, bias=cfg.mlp_bias,
                                       parallel="column", rank_slices=rows)
            self.activation = ACTIVATIONS[cfg.hidden_act]
        self.down_proj = plan.linear(prefix, {"down_proj": cfg.hidden_size}, size, bias=cfg.mlp_bias, parallel="row",
                                     rank_slices=rows)
        self.down_proj.reduce = reduce
        self.hidden_act = cfg.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.gate_up_proj if hasattr(self, "gate_up_proj") else self.up_proj
        # Where the products run in bfloat16 (many rows, packed weights), the intermediate stays in
        # it: its values are the GEMM's bfloat16 output either way, and it is the widest activation.
        x = x.to(up.method.activation_dtype(x))
        return self.down_proj(self.activation(up(x)))
