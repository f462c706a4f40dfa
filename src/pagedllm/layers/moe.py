"""Mixture of experts: a router picks each token's top-k expert MLPs (Mixtral, Qwen2-MoE, Qwen3-MoE).

The experts run batched over the step's tokens: the (token, expert) pairs are sorted by expert,
and each expert that got any multiplies all its rows in one product — a loop over experts, never
over tokens, so a step of many tokens costs about as many expert calls as a step of one. Each
expert's weights are its own Linear layers, packed or float like any other.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .linear import LinearPlan
from .mlp import MLP


class SparseMoE(nn.Module):
    """Σ over the top-k experts of softmax weight · expert(x), plus Qwen2-MoE's shared expert
    scaled by sigmoid(shared_expert_gate(x)) where the model has one."""

    def __init__(self, cfg: ModelConfig, plan: LinearPlan, prefix: str):
        super().__init__()
        self.top_k, self.normalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = plan.linear(prefix, {"gate": cfg.num_experts}, cfg.hidden_size, keep_float=True)
        # Under tensor parallelism every expert is split by width; the ranks' partial sums are added
        # once for the whole block (forward), not once per expert.
        self.tp = plan.tp if plan.tp is not None and plan.tp.size > 1 else None
        self.experts = nn.ModuleList(MLP(cfg, plan, f"{prefix}.experts.{e}", cfg.moe_intermediate_size, reduce=False)
                                     for e in range(cfg.num_experts))
        self.shared_expert = self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg, plan, f"{prefix}.shared_expert", cfg.shared_expert_intermediate_size,
                                     reduce=False)
            self.shared_expert_gate = plan.linear(prefix, {"shared_expert_gate": 1}, cfg.hidden_size, keep_float=True)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, expert ids), each [tokens, top_k]: the router's softmax in float32, as the references."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts_output(x, *self.route(x))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out if self.tp is None else self.tp.all_reduce(out)

    def experts_output(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        tokens = order // self.top_k
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        rows = x[tokens].split(counts)
        outputs = [self.experts[e](rows[e]) for e, n in enumerate(counts) if n]
        weighted = torch.cat(outputs).float() * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, tokens, weighted.to(x.dtype))
