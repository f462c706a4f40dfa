"""Mixture of experts: a router picks each token's top-k expert MLPs (Mixtral, Qwen2-MoE, Qwen3-MoE; GLM-4.5 and
DeepSeek V3's sigmoid scores with a choice bias and expert groups).

The experts run batched over the step's tokens: the (token, expert) pairs are sorted by expert,
and each expert that got any multiplies all its rows in one product — a loop over experts, never
over tokens, so a step of many tokens costs about as many expert calls as a step of one. Each
expert's weights are its own Linear layers, packed or float like any other. A step of one token (one
stream decoding) through packed experts skips the module calls: the chosen experts' gate/up rows are one
kernel call, their activations one batch, their down products one call each (_one_token_packed).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .linear import Linear, LinearPlan, PackedMethod
from .mlp import MLP


class SparseMoE(nn.Module):
    """Σ over the top-k experts of weight · expert(x), plus a shared expert where the model has one (Qwen2-MoE's
    scaled by sigmoid(shared_expert_gate(x)), DeepSeek's and GLM-4.5's as it is).

    Routing: the router's softmax (or sigmoid) scores; the experts chosen by the scores plus `expert_bias`
    (DeepSeek V3's correction, for the choice only), among the best `topk_groups` of `groups` groups of experts
    (_best_groups_only); their weights are their scores, renormalised where the model says, times
    `routed_scaling_factor`."""

    def __init__(self, cfg: ModelConfig, plan: LinearPlan, prefix: str):
        super().__init__()
        self.top_k, self.normalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.scoring, self.scale = cfg.moe_scoring, cfg.routed_scaling_factor
        self.groups, self.topk_groups = cfg.moe_groups, cfg.moe_topk_groups
        self.gate = plan.linear(prefix, {"gate": cfg.num_experts}, cfg.hidden_size, bias=cfg.router_bias,
                                keep_float=True)
        self.expert_bias = nn.Parameter(torch.empty(cfg.num_experts), requires_grad=False) if cfg.moe_expert_bias \
            else None
        # Under tensor parallelism every expert is split by width; the ranks' partial sums are added
        # once for the whole block (forward), not once per expert.
        self.tp = plan.tp if plan.tp is not None and plan.tp.size > 1 else None
        self.experts = nn.ModuleList(MLP(cfg, plan, f"{prefix}.experts.{e}", cfg.moe_intermediate_size, reduce=False)
                                     for e in range(cfg.num_experts))
        self.shared_expert = self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg, plan, f"{prefix}.shared_expert", cfg.shared_expert_intermediate_size,
                                     reduce=False)
            if cfg.shared_expert_gate:
                self.shared_expert_gate = plan.linear(prefix, {"shared_expert_gate": 1}, cfg.hidden_size,
                                                      keep_float=True)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, expert ids), each [tokens, top_k], in float32 as the references."""
        logits = self.gate(x).float()
        scores = torch.sigmoid(logits) if self.scoring == "sigmoid" else torch.softmax(logits, dim=-1)
        choice = scores if self.expert_bias is None else scores + self.expert_bias.float()
        if self.groups > 1:
            choice = self._best_groups_only(choice)
        experts = torch.topk(choice, self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scale if self.scale != 1.0 else weights, experts

    def _best_groups_only(self, choice: torch.Tensor) -> torch.Tensor:
        """`choice` with the experts outside each token's best topk_groups groups at −∞: groups scored by their
        two best sigmoid scores (DeepSeek V3, GLM-4.5), or by their best softmax one (DeepSeek V2)."""
        grouped = choice.view(len(choice), self.groups, -1)
        if self.scoring == "softmax":
            group_scores = grouped.max(dim=-1).values
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        best = group_scores.topk(self.topk_groups, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts_output(x, *self.route(x))
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            gate = None if self.shared_expert_gate is None else torch.sigmoid(self.shared_expert_gate(x))
            out = out + (shared if gate is None else gate * shared)
        return out if self.tp is None else self.tp.all_reduce(out)

    def experts_output(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        if len(x) == 1 and self.tp is None and not x.requires_grad:
            ids, order = experts[0].sort()  # the module path's order of summing, so the results are the same
            chosen = [self.experts[e] for e in ids.tolist()]
            if all(hasattr(m, "gate_up_proj") and _plain_packed(m.gate_up_proj) and _plain_packed(m.down_proj)
                   for m in chosen):
                return self._one_token_packed(x, weights[0, order], chosen)
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        tokens = order // self.top_k
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        rows = x[tokens].split(counts)
        outputs = [self.experts[e](rows[e]) for e, n in enumerate(counts) if n]
        weighted = torch.cat(outputs).float() * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, tokens, weighted.to(x.dtype))

    @staticmethod
    def _one_token_packed(x: torch.Tensor, weights: torch.Tensor, chosen: list[MLP]) -> torch.Tensor:
        """One token's chosen experts (packed, int8 activations): x quantised once and every expert's gate/up rows
        in one product (their parts stacked), the activations of all of them at once, then each expert's down
        product on its own row — the module path's arithmetic in a few calls."""
        ops = torch.ops.pagedllm_quant
        first = chosen[0]
        gate_up, down = first.gate_up_proj, first.down_proj
        isa, hidden, width = gate_up.method.isa, gate_up.in_features, down.in_features
        xq = ops.quantize_q8(x.float(), isa)
        products = torch.empty(1, len(chosen) * gate_up.out_features)
        ops.matmul_q8(xq, [d for m in chosen for d in m.gate_up_proj.part_data],
                      [t for m in chosen for t in m.gate_up_proj.part_types], hidden, products, isa)
        products = products.view(len(chosen), -1)
        if gate_up.bias is not None:
            products += torch.stack([m.gate_up_proj.bias for m in chosen])
        hidden_rows = first.activation(products).contiguous()  # [experts, width]
        hq = ops.quantize_q8(hidden_rows, isa)
        out = torch.empty(len(chosen), down.out_features)
        for i, m in enumerate(chosen):
            ops.matmul_q8(hq[i:i + 1], m.down_proj.part_data, m.down_proj.part_types, width, out[i:i + 1], isa)
        if down.bias is not None:
            out += torch.stack([m.down_proj.bias for m in chosen])
        weighted = (out.to(x.dtype).float() * weights[:, None]).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, torch.zeros(len(chosen), dtype=torch.long), weighted)


def _plain_packed(layer: Linear) -> bool:
    """A layer the one-token path multiplies by hand: packed with int8 activations, no LoRA update on it."""
    return isinstance(layer.method, PackedMethod) and layer.method.int8_activations and layer.lora is None
