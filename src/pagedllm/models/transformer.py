"""One decoder-only transformer for every family: the llama block, with the parts a family's
spec chooses (models/registry.py → ModelConfig).

Pre-norm RMSNorm (Gemma's 1 + w) or LayerNorm, a gated MLP (SwiGLU, GeGLU), a plain one, or routed
experts, rotary (partial, any pair layout: the loaders reorder q/k rows) or ALiBi positions, rotary embeddings (a second,
local base for windowed layers), grouped-query attention with optional q/k/v bias, per-head
q/k norms, soft-capped scores and per-layer sliding windows; Gemma 2/3's extra norms around each
sub-layer; scaled embeddings; tied or separate output embedding with optional soft-capping.
The forward pass takes a flat batch of tokens from many sequences and reads and writes K/V
through block tables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from ..config import ModelConfig
from ..distributed import RankRows, attention_heads, max_kv_heads, span
from ..layers.linear import Embedding, Linear, LinearPlan, PackedMethod, WeightLoadError, Weight
from ..attention import AttentionMetadata, LayerAttention, alibi_slopes, attention
from ..attention.backend import attention_weights, window_mask
from ..layers.mlp import MLP
from ..layers.moe import SparseMoE
from ..layers.norm import LayerNorm, RMSNorm
from ..layers.gated_delta_net import GatedDeltaNet
from ..layers.mla import LatentAttention
from ..layers.short_conv import ShortConv
from ..layers.rotary import (apply_rope, padded_inv_freq, query_temperature, rope_cos_sin, rope_inv_freq,
                             rope_long_inv_freq)
from .fused_decode import FusedDecodeLayer, FusedDecodeModel, new_decode_layers


def _norm(cfg: ModelConfig, size: int | None = None) -> RMSNorm | LayerNorm:
    if cfg.norm_kind == "layer":
        return LayerNorm(size or cfg.hidden_size, cfg.rms_norm_eps)
    return RMSNorm(size or cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: LinearPlan, prefix: str, layer: int):
        super().__init__()
        # Under tensor parallelism, this rank's heads (key/value heads shared where there are fewer than ranks).
        q_first, self.num_heads, kv_first, self.num_kv_heads = attention_heads(
            cfg.num_attention_heads, cfg.num_key_value_heads, plan.tp)
        self.head_dim = hd = cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * hd, self.num_kv_heads * hd
        # Qwen3.5's gated attention: q_proj gives each head its queries, then as many gate values.
        self.output_gate = cfg.attention_output_gate
        per_head = 2 * hd if self.output_gate else hd
        q_rows = RankRows.span(q_first * per_head, self.num_heads * per_head, cfg.num_attention_heads * per_head)
        kv_rows = RankRows.span(kv_first * hd, self.kv_size, cfg.num_key_value_heads * hd)
        self.q_proj_size = self.num_heads * per_head
        self.qkv_proj = plan.linear(prefix, {"q_proj": self.q_proj_size, "k_proj": self.kv_size, "v_proj": self.kv_size},
                                    cfg.hidden_size, bias=cfg.attention_bias, parallel="column",
                                    rank_slices=(q_rows, kv_rows, kv_rows))
        self.o_proj = plan.linear(prefix, {"o_proj": cfg.hidden_size}, self.q_size, bias=cfg.o_proj_bias,
                                  parallel="row",
                                  rank_slices=(RankRows.span(q_first * hd, self.q_size, cfg.num_attention_heads * hd),))
        # per head, or (OLMo 2) over the whole projection
        self.qk_norm_whole = cfg.qk_norm_whole
        self.q_norm = _norm(cfg, self.q_size if cfg.qk_norm_whole else self.head_dim) if cfg.qk_norm else None
        self.k_norm = _norm(cfg, self.kv_size if cfg.qk_norm_whole else self.head_dim) if cfg.qk_norm else None
        self.norm_after_rope = cfg.qk_norm_after_rope
        self.scale = cfg.scale
        self.query_scale = (cfg.query_scale_beta, cfg.query_scale_span) if cfg.query_scale_beta else None
        self.sliding_window = cfg.layer_window(layer)
        self.softcap = cfg.attn_logit_softcap
        slopes = alibi_slopes(cfg.num_attention_heads)[q_first:q_first + self.num_heads]
        self.register_buffer("alibi", slopes if cfg.position_encoding == "alibi" else None, persistent=False)
        self.sinks = None  # gpt-oss: a learned logit per head in its softmax (float32, as the kernels take it)
        if cfg.attention_sinks:
            self.sinks = nn.Parameter(torch.empty(self.num_heads, dtype=torch.float32), requires_grad=False)
            self.sinks.rank_rows = RankRows.span(q_first, self.num_heads, cfg.num_attention_heads)

    def layer_attention(self) -> LayerAttention:
        return LayerAttention(self.scale, self.sliding_window, self.softcap, self.alibi,
                              self.qkv_proj.method.gemm_dtype == torch.bfloat16, sinks=self.sinks)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Every token's K/V goes to the cache; the output is computed for `rows` only, where given."""
        q, k, v, gate = self._project(x)
        q, k = self._rotate(q, k, cos, sin)
        if meta.query_scale is not None:
            q = q * meta.query_scale[:, None, None].to(q.dtype)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        # Products in bfloat16 GEMMs (packed weights, many rows) take attention's products with them.
        matmul_dtype = self.qkv_proj.method.activation_dtype(x)
        out = attention(q, k, v, kv_cache, meta, self.layer_attention(), matmul_dtype).reshape(-1, self.q_size)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out if rows is None else out[rows])

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """q and k per head (normed where the family norms them), v, and the output gate (or None)."""
        q, k, v = self.qkv_proj(x).split([self.q_proj_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm_whole:
            q, k = self.q_norm(q), self.k_norm(k)
        gate = None
        if self.output_gate:
            q, gate = q.view(-1, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
            gate = gate.reshape(-1, self.q_size)
        q, k = q.reshape(-1, self.num_heads, self.head_dim), k.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and not (self.norm_after_rope or self.qk_norm_whole):
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v, gate

    def _rotate(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k rotated, then normed where the family norms them after the rotation (Hunyuan)."""
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.q_norm is not None and self.norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k

    def probabilities(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Probes: the attention weights [heads, tokens, tokens] (float32) of one sequence whose tokens
        from position 0 are all in `x` (the normed layer input), computed apart from the KV cache."""
        q, k, _, _ = self._project(x)
        q, k = (t.float() for t in self._rotate(q, k, cos, sin))
        positions = torch.arange(len(x), device=x.device)[None]
        if self.query_scale is not None:
            q = q * query_temperature(positions[0], *self.query_scale)[:, None, None]
        mask = window_mask(positions, len(x), self.sliding_window)
        return attention_weights(q.transpose(0, 1)[None], k.transpose(0, 1)[None], mask, self.layer_attention(),
                                 positions)[0]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: LinearPlan, prefix: str, layer: int):
        super().__init__()
        self.input_layernorm = _norm(cfg) if cfg.pre_norms else nn.Identity()  # OLMo 2 norms outputs only
        # The token mixer: attention over the paged cache, or (hybrid models) a recurrent part whose
        # per-sequence state stands where an attention layer's K/V pool would.
        mixer = cfg.layer_mixer(layer)
        attention_kind = LatentAttention if cfg.latent_attention else Attention
        self.self_attn = attention_kind(cfg, plan, f"{prefix}.self_attn", layer) if mixer == "attention" else None
        self.conv = ShortConv(cfg, plan, f"{prefix}.conv") if mixer == "short_conv" else None
        self.linear_attn = GatedDeltaNet(cfg, plan, f"{prefix}.linear_attn") if mixer == "gated_delta_net" else None
        # Llama's post-attention norm comes before the MLP; Gemma 2/3's is on the attention's output,
        # and two more wrap the MLP (the checkpoints' names, kept).
        self.post_attention_layernorm = _norm(cfg)
        self.pre_feedforward_layernorm = (_norm(cfg) if cfg.pre_norms else nn.Identity()) if cfg.sandwich_norms \
            else None
        self.post_feedforward_layernorm = _norm(cfg) if cfg.sandwich_norms else None
        self.mlp = SparseMoE(cfg, plan, f"{prefix}.mlp") if cfg.is_moe_layer(layer) else MLP(cfg, plan, f"{prefix}.mlp")
        self.rope_index = cfg.rotation_index(layer)  # which of the model's rotations
        self.residual_scale = cfg.residual_scale
        self.fused: FusedDecodeLayer | None = None  # set once the weights are in, where the layer qualifies
        self.index = layer

    def forward(self, x, cos, sin, kv_cache, meta, rows=None):
        """The module path (Transformer.forward sends few-row steps to `fused` where it is set). With
        `rows`, the output holds those rows only (every token's K/V is still written)."""
        attn = self._mix(self.input_layernorm(x), cos, sin, kv_cache, meta, rows)
        x = x if rows is None else x[rows]
        if self.residual_scale != 1.0:  # Granite
            x = x + attn * self.residual_scale
            return x + self.mlp(self.post_attention_layernorm(x)) * self.residual_scale
        if self.pre_feedforward_layernorm is None:
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


    def _mix(self, x, cos, sin, cache, meta, rows):
        if self.self_attn is not None:
            return self.self_attn(x, cos, sin, cache, meta, rows)
        recurrent = self.conv if self.conv is not None else self.linear_attn
        out = recurrent(x, cache, meta.states)  # every token's state update; then the rows wanted
        return out if rows is None else out[rows]


_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Probes' view of the forward pass: (layer index, its input, its output) hidden states. The output is
# the next layer's input, which a fused layer updates in place: an observer copies what it keeps.
LayerObserver = Callable[[int, torch.Tensor, torch.Tensor], None]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: LinearPlan | None = None):
        super().__init__()
        plan = plan or LinearPlan()
        self.config = cfg
        # The embedding is packed only as the checkpoint stores it: quantising a float table at load
        # would change the tied head's logits for a small saving.
        embed_plan = LinearPlan(plan.packed, None, plan.device)
        self.tp = plan.tp if plan.tp is not None and plan.tp.size > 1 else None
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size,
                                      method=embed_plan.method_for(["model.embed_tokens.weight"], cfg.hidden_size,
                                                                   output_head=cfg.tie_word_embeddings), tp=self.tp)
        self.embed_layernorm = _norm(cfg) if cfg.embedding_norm else None
        self.layers = nn.ModuleList(DecoderLayer(cfg, plan, f"model.layers.{i}", i) for i in range(cfg.num_hidden_layers))
        self.norm = _norm(cfg)
        first, count = span(cfg.vocab_size, self.tp)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, count, method=plan.method_for(["lm_head.weight"], cfg.hidden_size, output_head=True),
            parallel="column", tp=self.tp, rank_slices=(RankRows.span(first, count, cfg.vocab_size),))
        # What each rank's KV pool is planned for: the most key/value heads a rank holds, so that every
        # rank has as many blocks as rank 0's scheduler hands out.
        self.planned_kv_heads = 1 if cfg.latent_attention else max_kv_heads(
            cfg.num_attention_heads, cfg.num_key_value_heads, self.tp.size if self.tp else 1)
        self.planned_state_bytes = cfg.planned_state_bytes(self.tp.size if self.tp else 1)  # likewise, a state slot
        self.head_scale: torch.Tensor | None = None  # per-row scale of the logits (normalized_head), set at load
        self.lora_context = None  # set where LoRA adapters may apply (lora/layers.py: ModelAdapters)
        self.fused_model: FusedDecodeModel | None = None  # set once the weights are in, where every layer is fused
        self.register_buffer("inv_freq", self._frequencies(rope_inv_freq, cfg.rope_theta, cfg.rope_scaling),
                             persistent=False)
        if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "longrope":
            self.register_buffer("long_inv_freq", self._frequencies(rope_long_inv_freq, cfg.rope_theta,
                                                                    cfg.rope_scaling), persistent=False)
        local_theta = cfg.local_rope_theta or cfg.rope_theta  # windowed layers' rotation, unscaled
        self.register_buffer("local_inv_freq", self._frequencies(rope_inv_freq, local_theta, None), persistent=False)

    def _frequencies(self, inv_freq_of, theta: float, scaling) -> torch.Tensor:
        """Rotation frequencies over the whole head: a partial rotation's padded with 0, and all 0
        (cos 1, sin 0: the identity) where positions are not rotary (ALiBi, none)."""
        cfg = self.config
        if cfg.position_encoding != "rope":
            return torch.zeros(cfg.head_dim // 2)
        return padded_inv_freq(inv_freq_of(cfg.rope_dims, theta, scaling), cfg.head_dim)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, observe: LayerObserver | None = None,
                output_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [tokens, hidden] for a flat batch of tokens from many sequences. `observe`
        (probes) is called with each layer's index, input and output hidden states.

        `output_rows`: the only rows wanted (a step's sampled ones), returned in that order. The last
        layer then runs its attention output, o-proj and MLP on those rows alone, as llama.cpp does
        (1/num_layers of a prefill's products). Not with `observe` or LoRA adapters in the step."""
        x = self.embed_tokens(input_ids).to(self.norm.weight.dtype)  # quantised tables dequantise to float32
        if self.config.embedding_scale != 1.0:
            x = x * torch.tensor(self.config.embedding_scale, dtype=x.dtype)
        if self.embed_layernorm is not None:
            x = self.embed_layernorm(x)
        ropes = self.rotations(positions, meta, x.dtype)
        if self.config.query_scale_beta:
            meta.query_scale = query_temperature(positions, self.config.query_scale_beta, self.config.query_scale_span)
        segments = self.lora_context.segments if self.lora_context is not None else []
        prune_last = output_rows is not None and observe is None and not segments  # adapters' segments are all rows
        last = self.layers[-1]
        if self.fused_model is not None and observe is None and self.fused_model.applies_to(x, meta):
            x = self.fused_model(x, ropes, kv_caches, meta, segments)
            return self.norm(x if output_rows is None else x[output_rows])
        for layer, kv_cache in zip(self.layers, kv_caches):
            cos, sin = ropes[layer.rope_index]
            fused = layer.fused  # called directly: at ~60 µs a layer, nn.Module's call costs show
            before = x if observe is None else x.clone()  # the fused layer updates x in place
            if fused is not None and fused.applies_to(x, meta):
                x = fused(x, cos, sin, kv_cache, meta, fused.lora_updates(segments))
            elif prune_last and layer is last:
                x, output_rows = layer(x, cos, sin, kv_cache, meta, output_rows), None
            else:
                x = layer(x, cos, sin, kv_cache, meta)
            if observe is not None:
                observe(layer.index, before, x)
        return self.norm(x if output_rows is None else x[output_rows])

    def rotations(self, positions: torch.Tensor, meta: AttentionMetadata,
                  dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) of the tokens for each of the model's rotations (a layer's `rope_index` picks one)."""
        ropes = [self._global_rope(positions, meta, dtype)]
        if self.config.local_rope_theta is not None:
            ropes.append(rope_cos_sin(positions, self.local_inv_freq, dtype))
        if self.config.nope_layers:  # the identity: cos 1, sin 0
            ropes.append(rope_cos_sin(positions, torch.zeros_like(self.inv_freq), dtype))
        return ropes

    def _global_rope(self, positions: torch.Tensor, meta: AttentionMetadata,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        scaling = self.config.rope_scaling
        if scaling is not None and scaling.kind == "yarn":
            return rope_cos_sin(positions, self.inv_freq, dtype, scaling.attention_factor)
        if scaling is None or scaling.kind != "longrope":
            return rope_cos_sin(positions, self.inv_freq, dtype)
        # LongRoPE, as transformers runs it: a sequence longer than the original context (as far as
        # this step reaches) takes the long factors; its cached keys keep the rotation they got.
        context = torch.empty_like(positions)
        for group in meta.groups:
            context[group.rows] = group.context_lens[group.token_seq]
        long = (context > scaling.original_max_position_embeddings)[:, None]
        inv_freq = torch.where(long, self.long_inv_freq, self.inv_freq)
        return rope_cos_sin(positions, inv_freq, dtype, scaling.attention_factor)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = Linear.forward(self._head, hidden).float()
        if self.head_scale is not None:
            logits = logits * self.head_scale
        if self.config.logits_scaling != 1.0:
            logits = logits / self.config.logits_scaling
        if self.tp is not None:
            logits = self.tp.all_gather(logits)  # each rank scored its slice of the vocabulary
        cap = self.config.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @classmethod
    def create(cls, cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               plan: LinearPlan | None = None) -> "Transformer":
        """A model on `device` whose weights are allocated but not initialised (load_weights fills them)."""
        with torch.device(device):
            model = cls(cfg, plan)
        model.to(dtype)
        model.inv_freq = model.inv_freq.float()  # rotary frequencies stay float32, as in the reference
        model.local_inv_freq = model.local_inv_freq.float()
        if hasattr(model, "long_inv_freq"):
            model.long_inv_freq = model.long_inv_freq.float()
        for layer in model.attention_layers:
            if layer.self_attn.alibi is not None:
                layer.self_attn.alibi = layer.self_attn.alibi.float()  # the kernels read float32 slopes
            if getattr(layer.self_attn, "sinks", None) is not None:
                layer.self_attn.sinks.data = layer.self_attn.sinks.data.float()  # and float32 sinks
        return model

    def load_weights(self, weights: Iterable[tuple[str, Weight]]) -> None:
        """Place canonical (Hugging Face-named) tensors; every parameter must be filled exactly."""
        linears = {name: m for name, m in self.named_modules() if isinstance(m, Linear)}
        params = {name: p for name, p in self.named_parameters() if not _owned_by_linear(name, linears)}
        norms = {name: m for name, m in self.named_modules() if isinstance(m, RMSNorm)}
        # Checkpoint tensor → (layer, shard): each fused layer knows the tensors it is made of.
        shards = {checkpoint: (module, i) for module, layer in linears.items()
                  for i, checkpoint in enumerate(layer.checkpoint_names)}
        filled: set[str] = set()
        for name, tensor in weights:
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            target, shard = self._locate(name, shards)
            module, _, leaf = target.rpartition(".")
            if module in linears and leaf in ("weight", "bias"):
                linears[module].load_shard(shard or 0, tensor, name, leaf)
            elif target in params:
                _copy_param(params[target], tensor, name, norms.get(module))
            else:
                raise WeightLoadError(f"unexpected tensor {name!r}: the model has no place for it")
            filled.add(f"{target}#{shard or 0}")
        expected = [f"{n}#0" for n in params] + [
            f"{m}.{leaf}#{i}" for m, layer in linears.items() for leaf in ("weight", "bias")[: 1 + (layer.bias is not None)]
            for i in range(len(layer.shard_sizes))]
        missing = [n for n in expected if n not in filled]
        if missing:
            raise WeightLoadError(f"missing tensor(s) for {', '.join(m.split('#')[0] for m in missing[:5])}")
        for layer in linears.values():
            layer.method.finish(layer)
        self._build_fused_decode()
        if self.config.normalized_head:  # Baichuan 2's NormHead: x · W_iᵀ / ‖W_i‖, whatever W's storage
            self.head_scale = 1 / self._head.method.row_norms(self._head).clamp_min(1e-12)

    def _build_fused_decode(self) -> None:
        """The fused C++ decode path of each layer that qualifies, and of the whole model where all do.
        Not under tensor parallelism: the C++ layer sums no partial products across ranks."""
        layers = None
        for layer in self.layers:
            layer.fused = None
            if self.tp is None and FusedDecodeLayer.qualifies(layer):
                layers = layers if layers is not None else new_decode_layers()
                layer.fused = FusedDecodeLayer.build(layer, layers)
        fused = [layer.fused for layer in self.layers]
        self.fused_model = FusedDecodeModel(layers, fused) if layers is not None and all(fused) else None

    def drop_fused_decode(self) -> None:
        """Every layer back on the module path (training: the C++ layers have no backward pass)."""
        for layer in self.layers:
            layer.fused = None
        self.fused_model = None

    def checkpoint_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(canonical checkpoint tensor, its values now) for every float tensor load_weights placed: rows
        in the model's order, fused checkpoint tensors as their parts, a Gemma norm's 1 + w given back as
        w — what a trained model writes out (training/export.py). Dense (float) layers only."""
        linears = {name: m for name, m in self.named_modules() if isinstance(m, Linear)}
        norms = {name: m for name, m in self.named_modules() if isinstance(m, RMSNorm)}
        for module, layer in linears.items():
            names = layer.checkpoint_names or (_canonical(module),)
            for shard, checkpoint in enumerate(names):
                offset, size = layer.shard_offset(shard), layer.shard_sizes[shard]
                yield f"{checkpoint}.weight", layer.weight.narrow(0, offset, size)
                if layer.bias is not None:
                    yield f"{checkpoint}.bias", layer.bias.narrow(0, offset, size)
        for name, param in self.named_parameters():
            if not _owned_by_linear(name, linears):
                norm = norms.get(name.rpartition(".")[0])
                yield _canonical(name), param - norm.offset if norm is not None and norm.offset else param

    @property
    def capturable(self) -> bool:
        """Whether a forward pass decides nothing on the host from the step's data, so that it can be
        captured in a CUDA graph: routed experts sort tokens by expert, LoRA adapters gather rows by
        adapter, recurrent layers (hybrids) index their states by the step's sequences, LongRoPE picks frequencies from context lengths, and tensor-parallel all-reduces are
        not captured (yet; gloo's are no CUDA kernels)."""
        scaling = self.config.rope_scaling
        return (self.tp is None and self.lora_context is None and not self.config.is_hybrid
                and not any(isinstance(layer.mlp, SparseMoE) for layer in self.layers)
                and (scaling is None or scaling.kind != "longrope") and not self.config.query_scale_beta)

    @property
    def attention_layers(self) -> list[DecoderLayer]:
        """The layers whose K/V live in the paged pool (all of them but a hybrid model's recurrent ones)."""
        return [layer for layer in self.layers if layer.self_attn is not None]

    @property
    def _head(self) -> Linear:
        return self.embed_tokens if self.lm_head is None else self.lm_head

    @property
    def packed_weights(self) -> bool:
        """Whether some linear layer multiplies packed GGML blocks (the CPU's quantised path)."""
        return any(isinstance(m, Linear) and isinstance(m.method, PackedMethod) for m in self.modules())

    def weight_bytes(self) -> int:
        """Bytes the weights take as stored (packed blocks counted as they are)."""
        linears = {name: m for name, m in self.named_modules() if isinstance(m, Linear)}
        packed = sum(m.method.weight_bytes(m) for m in linears.values())
        return packed + sum(p.numel() * p.element_size() for n, p in self.named_parameters()
                            if not (n.endswith(".weight") and _owned_by_linear(n, linears)))

    @staticmethod
    def _locate(name: str, shards: dict[str, tuple[str, int]]) -> tuple[str, int | None]:
        """The parameter a canonical tensor fills, and its shard where the layer is fused."""
        checkpoint, _, leaf = name.rpartition(".")
        if checkpoint in shards:
            module, shard = shards[checkpoint]
            return f"{module}.{leaf}", shard
        return name.removeprefix("model."), None


def _canonical(path: str) -> str:
    """The canonical checkpoint name of a module or parameter load_weights placed by its path (_locate)."""
    return path if path.startswith("lm_head") else f"model.{path}"


def _owned_by_linear(param_name: str, linears: dict[str, Linear]) -> bool:
    module, _, leaf = param_name.rpartition(".")
    return leaf in ("weight", "bias") and module in linears


def _copy_param(param: nn.Parameter, tensor: torch.Tensor, name: str, norm: RMSNorm | None = None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise WeightLoadError(f"tensor {name!r} is quantised, but the model keeps it in float")
    rows = getattr(param, "rank_rows", None)  # under tensor parallelism, where this rank's rows lie in the tensor
    expected = tuple(param.shape) if rows is None else (rows.size, *param.shape[1:])
    if tuple(tensor.shape) != expected:
        raise WeightLoadError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {expected}")
    if rows is not None:
        tensor = rows.take(tensor)
    if norm is not None:
        norm.load_weight(tensor)
        return
    with torch.no_grad():
        param.data.copy_(tensor)
