"""Multi-head latent attention (DeepSeek V2 / V3): every head's keys and values come from one compressed
latent a token (kv_lora_rank values, RMS-normalised) and one rotary key part shared by the heads, and only
those are cached — a layer's pool row a token is latent | rotary key, whatever the number of heads.

Attention runs in the latent space, the up-projections absorbed (as vLLM, SGLang and llama.cpp decode): each
head's no-rope query goes through its key up-projection W_UK into the latent's space, so a score is
q_latent · latent + q_rope · k_rope over the cached rows, and the weighted sum of latents goes through the
head's value up-projection W_UV. To the attention backend this is multi-query attention whose values are the
first kv_lora_rank entries of each key row (LayerAttention.value_dim). Queries come through a low-rank
projection with its norm (V3, V2) or one projection (V2-Lite). DeepSeek pairs rotary dims (2i, 2i + 1): the
rotary parts are put in rotate-half order here, the same order for queries and cached keys.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention import AttentionMetadata, LayerAttention, attention
from ..config import ModelConfig
from .linear import DenseMethod, Linear, LinearPlan
from .norm import RMSNorm
from .rotary import apply_rope


class LatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: LinearPlan, prefix: str, layer: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = 1  # the pool's one row a token, read by every head
        self.rope_dim, self.nope_dim, self.value_dim = cfg.head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
        self.rank, self.interleaved = cfg.kv_lora_rank, cfg.rope_interleaved
        q_width = self.num_heads * (self.nope_dim + self.rope_dim)
        if cfg.q_lora_rank:
            self.q_a_proj = plan.linear(prefix, {"q_a_proj": cfg.q_lora_rank}, cfg.hidden_size, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, cfg.norm_offset)
            self.q_b_proj = plan.linear(prefix, {"q_b_proj": q_width}, cfg.q_lora_rank)
        else:
            self.q_proj = plan.linear(prefix, {"q_proj": q_width}, cfg.hidden_size)
        self.kv_a_proj_with_mqa = plan.linear(prefix, {"kv_a_proj_with_mqa": self.rank + self.rope_dim},
                                              cfg.hidden_size, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, cfg.rms_norm_eps, cfg.norm_offset)
        # The up-projections act as matrices (absorbed into queries and outputs): float, whatever the file stores.
        self.kv_b_proj = Linear(self.rank, self.num_heads * (self.nope_dim + self.value_dim), method=DenseMethod())
        self.kv_b_proj.checkpoint_names = (f"{prefix}.kv_b_proj",)
        self.o_proj = plan.linear(prefix, {"o_proj": cfg.hidden_size}, self.num_heads * self.value_dim,
                                  bias=cfg.attention_bias)
        self.scale = cfg.scale
        self.alibi = None  # as Attention's: no position biases

    def layer_attention(self) -> LayerAttention:
        return LayerAttention(self.scale, value_dim=self.rank)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Every token's row goes to the cache; the output is computed for `rows` only, where given."""
        query, row = self._project(x, cos, sin)
        out = attention(query, row, None, kv_cache, meta, self.layer_attention())  # [tokens, heads, rank]
        if rows is not None:
            out = out[rows]
        _, w_uv = self._up_projections()
        return self.o_proj(torch.einsum("thr,hvr->thv", out, w_uv).reshape(len(out), -1))

    def probabilities(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Probes: the attention weights [heads, tokens, tokens] (float32) of one sequence whose tokens from
        position 0 are all in `x` (the normed layer input), computed apart from the KV cache."""
        query, row = self._project(x, cos, sin)
        scores = torch.einsum("qhd,kd->hqk", query.float(), row[:, 0].float()) * self.scale
        causal = torch.ones(len(x), len(x), dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1)

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The absorbed queries [tokens, heads, rank + rope] and the rows to cache [tokens, 1, rank + rope]."""
        tokens = len(x)
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if hasattr(self, "q_a_proj") else self.q_proj(x)
        q_nope, q_rope = q.view(tokens, self.num_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope_dim], dim=-1)
        w_uk, _ = self._up_projections()
        q_latent = torch.einsum("thn,hnr->thr", q_nope, w_uk)
        query = torch.cat([q_latent, self._rotate(q_rope, cos, sin)], dim=-1)
        row = torch.cat([self.kv_a_layernorm(latent), self._rotate(k_rope[:, None], cos, sin)[:, 0]], dim=-1)
        return query, row[:, None]

    def _up_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [heads, nope, rank] and W_UV [heads, value, rank], views of kv_b_proj's weight."""
        weight = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.value_dim, self.rank)
        return weight.split([self.nope_dim, self.value_dim], dim=1)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.interleaved:  # pairs (2i, 2i + 1) → (i, i + rope / 2)
            x = x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
        return apply_rope(x, cos, sin)
