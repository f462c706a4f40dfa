"""One decoder-only transformer for the whole llama family.

Pre-norm RMSNorm, SwiGLU MLP, rotary embeddings, grouped-query attention with optional q/k/v
bias, tied or separate output embedding, optional sliding window. Families differ only in
their ModelConfig; the forward pass takes a flat batch of tokens from many sequences and reads
and writes K/V through block tables.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import PagedLLMError
from ..layers.linear import Embedding, Linear
from ..layers.attention import AttentionMetadata, build_attention_mask, paged_attention
from ..layers.norm import RMSNorm
from ..layers.rotary import apply_rope, rope_cos_sin, rope_inv_freq


class WeightLoadError(PagedLLMError, ValueError):
    """Weights that do not fit the model: a missing, unexpected or mis-shaped tensor."""


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5
        self.sliding_window = cfg.sliding_window

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, masks: list[torch.Tensor]) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(-1, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(-1, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, kv_cache, meta, masks, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv_cache, meta, masks):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta, masks)
        return x + self.mlp(self.post_attention_layernorm(x))


# Canonical (Hugging Face) names whose tensors are slices of one fused parameter here.
_FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [tokens, hidden] for a flat batch of tokens from many sequences."""
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        masks = [build_attention_mask(group, self.config.sliding_window) for group in meta.groups]
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, kv_cache, meta, masks)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    @classmethod
    def create(cls, cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "Transformer":
        """A model on `device` whose weights are allocated but not initialised (load_weights fills them)."""
        with torch.device(device):
            model = cls(cfg)
        model.to(dtype)
        model.inv_freq = model.inv_freq.float()  # rotary frequencies stay float32, as in the reference
        return model

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Place canonical (Hugging Face-named) tensors; every parameter must be filled exactly."""
        params = dict(self.named_parameters())
        filled: set[str] = set()
        for name, tensor in weights:
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            target, shard = self._locate(name)
            if target not in params:
                raise WeightLoadError(f"unexpected tensor {name!r}: the model has no place for it")
            self._copy_into(params[target], target, tensor, shard, name)
            filled.add(f"{target}#{shard}")
        missing = [n for n in self._expected_slots(params) if n not in filled]
        if missing:
            raise WeightLoadError(f"missing tensor(s) for {', '.join(m.split('#')[0] for m in missing[:5])}")

    @staticmethod
    def _locate(name: str) -> tuple[str, int | None]:
        name = name.removeprefix("model.")
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in _FUSED:
            fused, shard = _FUSED[parts[-2]]
            return ".".join(parts[:-2] + [fused, parts[-1]]), shard
        return name, None

    def _expected_slots(self, params: dict[str, nn.Parameter]) -> list[str]:
        slots = []
        for name in params:
            shards = 3 if ".qkv_proj." in name else 2 if ".gate_up_proj." in name else None
            slots += [f"{name}#{i}" for i in range(shards)] if shards else [f"{name}#None"]
        return slots

    def _copy_into(self, param: nn.Parameter, param_name: str, tensor: torch.Tensor, shard: int | None,
                   name: str) -> None:
        target = param.data
        if shard is not None:
            sizes = self._shard_sizes(param_name)
            target = target.narrow(0, sum(sizes[:shard]), sizes[shard])
        if tuple(target.shape) != tuple(tensor.shape):
            raise WeightLoadError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}")
        if shard is None and tensor.dtype == target.dtype and tensor.device == target.device:
            param.data = tensor  # take the loader's tensor as it is: no second copy of the weights
            return
        with torch.no_grad():
            target.copy_(tensor)

    def _shard_sizes(self, param_name: str) -> list[int]:
        cfg = self.config
        if ".qkv_proj." in param_name:
            kv = cfg.num_key_value_heads * cfg.head_dim
            return [cfg.num_attention_heads * cfg.head_dim, kv, kv]
        return [cfg.intermediate_size, cfg.intermediate_size]
