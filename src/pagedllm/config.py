"""Frozen configuration objects. Each component receives only its own slice."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .distributed import TensorParallel, delta_net_heads, span
from .errors import ConfigError


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are stretched for long contexts.

    kind: "linear" (positions divided by `factor`), "llama3" (low frequencies divided by
    `factor`, high ones kept, a smooth ramp between), "freq_factors" (explicit per-frequency
    divisors, as llama.cpp stores llama-3 scaling in a GGUF's `rope_freqs` tensor) or "longrope"
    (Phi-3: `freq_factors` divide the frequencies of a sequence up to
    `original_max_position_embeddings` tokens long, `long_factors` those of a longer one, and
    cos/sin are multiplied by `attention_factor`) or "yarn" (frequencies divided by `factor` below
    a ramp between the dims that turn `beta_fast` and `beta_slow` times over the original context,
    kept above it; cos/sin × `attention_factor`).
    """

    kind: str
    freq_factors: tuple[float, ...] = ()
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    long_factors: tuple[float, ...] = ()
    attention_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True  # YaRN's ramp ends rounded to whole dims (transformers' default; llama.cpp always)


POSITION_ENCODINGS = ("rope", "alibi", "none")
# What mixes a layer's tokens: attention over the paged KV cache, or a recurrent part that keeps a
# fixed-size state per sequence instead (hybrid models): LFM2's gated short convolution, Qwen3.5's
# Gated DeltaNet linear attention.
LAYER_MIXERS = ("attention", "short_conv", "gated_delta_net")
# Activations of the MLP's gate (or of its one projection, for an ungated MLP).
# "swiglu_oai": gpt-oss's clamped SwiGLU, (clamp(up) + 1) · g · sigmoid(swiglu_alpha · g), g = gate clamped above.
HIDDEN_ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "swiglu_oai")
MOE_SCORINGS = ("softmax", "sigmoid")  # how a router's logits become expert scores


@dataclass(frozen=True)
class ModelConfig:
    """The shape of one decoder-only transformer, whatever file and family it came from.

    The parts every family shares have llama's defaults; a family's spec (models/registry.py)
    and its checkpoint choose the rest: Gemma's (1 + w) norms are `norm_offset` 1, Qwen3's and
    Gemma 3's per-head q/k norms `qk_norm`, Gemma 2/3's norms after attention and around the MLP
    `sandwich_norms`; windows per layer (`sliding_layers`) with their own rope base, soft-capping.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # Position encoding: "rope" (on the first `rotary_dim` dims of each head; None: all of them),
    # "alibi" (linear biases on the scores, per head) or "none".
    position_encoding: str = "rope"
    rotary_dim: int | None = None
    # The checkpoint's q/k rows pair dims (2i, 2i + 1) for rotation (GLM) rather than (i, i + dim/2);
    # the loaders reorder the rows to the latter, which the model runs (latent attention reorders its rotary
    # parts itself: layers/mla.py).
    rope_interleaved: bool = False
    nope_layers: tuple[int, ...] = ()  # layers whose attention has no rotary positions (SmolLM3's every 4th)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    # Which layers the window applies to (None: all of them, when there is a window).
    sliding_layers: tuple[bool, ...] | None = None
    local_rope_theta: float | None = None  # the windowed layers' rope base (unscaled), where it differs
    norm_kind: str = "rms"  # "rms": RMSNorm; "layer": LayerNorm with a bias (BLOOM); eps is rms_norm_eps either way
    embedding_norm: bool = False  # a norm right after the embeddings (BLOOM)
    gated_mlp: bool = True  # down(act(gate) · up); False: down(act(up)) (BLOOM)
    mlp_bias: bool = False
    o_proj_bias: bool = False
    normalized_head: bool = False  # the output head's rows are scaled to unit length (Baichuan 2)
    norm_offset: float = 0.0  # each RMSNorm scales by (norm_offset + w)
    qk_norm: bool = False  # an RMSNorm over each head of q and of k, before the rotation
    qk_norm_after_rope: bool = False  # those norms after the rotation instead (Hunyuan)
    qk_norm_whole: bool = False  # those norms over the whole q and k projections, not each head (OLMo 2)
    sandwich_norms: bool = False  # norms on the attention's output and around the MLP (Gemma 2/3)
    pre_norms: bool = True  # False: a layer norms only each sub-layer's output, not its input (OLMo 2)
    hidden_act: str = "silu"
    swiglu_alpha: float = 1.702  # "swiglu_oai"'s sigmoid slope and clamp (gpt-oss's, and llama.cpp's fixed values)
    swiglu_limit: float = 7.0
    attention_sinks: bool = False  # each head has a learned logit in its softmax's denominator (gpt-oss)
    embedding_scale: float = 1.0  # the embeddings are multiplied by this (Gemma: √hidden; Granite's multiplier)
    residual_scale: float = 1.0  # each sub-layer's output × this before the residual add (Granite)
    logits_scaling: float = 1.0  # the logits ÷ this (Granite)
    attention_scale: float | None = None  # None: head_dim ** -0.5
    # Queries × 1 + beta · ln(1 + ⌊position / span⌋) (Ministral 3's long-context temperature; beta 0: none).
    query_scale_beta: float = 0.0
    query_scale_span: int = 0
    attn_logit_softcap: float | None = None  # scores → cap · tanh(scores / cap)
    final_logit_softcap: float | None = None
    # Mixture of experts (0 experts: a dense MLP in every layer).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each expert's intermediate width
    shared_expert_intermediate_size: int = 0  # an always-on expert's width (0: none)
    shared_expert_gate: bool = True  # Qwen2-MoE's shared expert is scaled by sigmoid(a gate); DeepSeek's is not
    norm_topk_prob: bool = False  # the top-k weights are renormalised to sum to 1
    dense_layers: tuple[int, ...] = ()  # layers that keep the dense MLP in a MoE model
    # DeepSeek-style routing (GLM-4.5, DeepSeek V2 / V3): the router's scores (MOE_SCORINGS), a per-expert bias
    # added to them for the choice only, the choice limited to the best `moe_topk_groups` of `moe_groups`
    # groups of experts (a group scored by its two best sigmoid scores, or its best softmax one), and the
    # weights scaled after the renormalising.
    moe_scoring: str = "softmax"
    moe_expert_bias: bool = False
    router_bias: bool = False  # the router's logits have a bias (gpt-oss)
    moe_groups: int = 1
    moe_topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    # Hybrid models: each layer's mixer (LAYER_MIXERS; None: attention everywhere), and the short
    # convolution's taps and bias (LFM2).
    layer_mixers: tuple[str, ...] | None = None
    conv_kernel: int = 0
    conv_bias: bool = False
    # Gated DeltaNet's heads (its value heads a multiple of its key heads); its convolution has conv_kernel taps.
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    # Value heads in llama.cpp's tiled order (head h reads key head h mod key heads; Qwen3.5 GGUF files)
    # rather than grouped by key head (h // (value heads / key heads); Hugging Face checkpoints).
    linear_value_heads_tiled: bool = False
    attention_output_gate: bool = False  # q_proj also gives each head a gate: o_proj(attention · sigmoid(gate))
    # Multi-head latent attention (DeepSeek V2 / V3; kv_lora_rank > 0): each token caches a latent of
    # kv_lora_rank values and a rotary key part of head_dim values (head_dim is the rotary part's size here),
    # shared by the heads, whose no-rope query and key parts have qk_nope_head_dim values and whose values
    # v_head_dim; queries through a low-rank path of q_lora_rank (0: one projection).
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model config: {self.num_attention_heads} attention heads are not a multiple of "
                f"{self.num_key_value_heads} key/value heads"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"model config: sliding_window must be positive, got {self.sliding_window}")
        if self.sliding_layers is not None and len(self.sliding_layers) != self.num_hidden_layers:
            raise ConfigError(f"model config: {len(self.sliding_layers)} sliding-layer flags for "
                              f"{self.num_hidden_layers} layers")
        if not self.pre_norms and not self.sandwich_norms:
            raise ConfigError("model config: layers without input norms need the norms after each sub-layer "
                              "(sandwich_norms)")
        if self.qk_norm_whole and not self.qk_norm:
            raise ConfigError("model config: qk_norm_whole describes q/k norms (qk_norm)")
        if self.norm_kind not in ("rms", "layer"):
            raise ConfigError(f"model config: norm kind {self.norm_kind!r} is not one of rms, layer")
        if self.position_encoding not in POSITION_ENCODINGS:
            raise ConfigError(f"model config: position encoding {self.position_encoding!r} is not one of "
                              f"{', '.join(POSITION_ENCODINGS)}")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0
                                                and (self.head_dim - self.rotary_dim) % 2 == 0):
            raise ConfigError(f"model config: rotary_dim {self.rotary_dim} must be even and within the head "
                              f"({self.head_dim})")
        if self.hidden_act not in HIDDEN_ACTIVATIONS:
            raise ConfigError(f"model config: activation {self.hidden_act!r} is not supported "
                              f"(supported: {', '.join(HIDDEN_ACTIVATIONS)})")
        if self.num_experts and not (0 < self.num_experts_per_tok <= self.num_experts
                                     and self.moe_intermediate_size > 0):
            raise ConfigError(f"model config: {self.num_experts} experts need 1 to {self.num_experts} experts per "
                              f"token (got {self.num_experts_per_tok}) and a positive expert size "
                              f"(got {self.moe_intermediate_size})")
        self._check_routing()
        self._check_mixers()
        if not all(isinstance(i, int) and 0 <= i < self.num_hidden_layers for i in self.nope_layers):
            raise ConfigError(f"model config: layers without rotary positions must be layer indices, got "
                              f"{list(self.nope_layers)[:8]}")
        if self.kv_lora_rank and not all(isinstance(v, int) and v > 0 for v in (self.qk_nope_head_dim, self.v_head_dim)):
            raise ConfigError(f"model config: latent attention needs positive qk_nope_head_dim and v_head_dim, got "
                              f"{self.qk_nope_head_dim!r} and {self.v_head_dim!r}")
        for name in ("kv_lora_rank", "q_lora_rank"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise ConfigError(f"model config: {name} must be a count, got {getattr(self, name)!r}")
        for name in ("rms_norm_eps", "rope_theta", "embedding_scale", "residual_scale", "logits_scaling",
                     "swiglu_alpha", "swiglu_limit"):
            # NaN, 0 or infinite: every activation turns NaN
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ConfigError(f"model config: {name} must be a positive finite number, got {value!r}")
        if not (isinstance(self.query_scale_beta, (int, float)) and 0 <= self.query_scale_beta < math.inf) or \
                (self.query_scale_beta and not (isinstance(self.query_scale_span, int) and self.query_scale_span > 0)):
            raise ConfigError(f"model config: a query temperature needs a finite beta ≥ 0 and a positive span, got "
                              f"{self.query_scale_beta!r} and {self.query_scale_span!r}")
        for name in ("attention_scale", "attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"model config: {name} must be positive, got {value!r}")

    def _check_mixers(self) -> None:
        mixers = self.layer_mixers
        if mixers is None:
            return
        if len(mixers) != self.num_hidden_layers:
            raise ConfigError(f"model config: {len(mixers)} layer mixers for {self.num_hidden_layers} layers")
        unknown = sorted(set(mixers) - set(LAYER_MIXERS))
        if unknown:
            raise ConfigError(f"model config: layer mixers {', '.join(map(repr, unknown))} are not one of "
                              f"{', '.join(LAYER_MIXERS)}")
        if set(mixers) - {"attention"} and not 2 <= self.conv_kernel <= 64:
            raise ConfigError(f"model config: a recurrent layer's convolution needs 2 to 64 taps, got {self.conv_kernel!r}")
        heads = (self.linear_num_key_heads, self.linear_num_value_heads, self.linear_key_head_dim,
                 self.linear_value_head_dim)
        if "gated_delta_net" in mixers and not (all(isinstance(n, int) and n > 0 for n in heads)
                                                and heads[1] % heads[0] == 0):
            raise ConfigError(f"model config: Gated DeltaNet needs positive head counts and sizes, its value heads a "
                              f"multiple of its key heads (got {heads})")

    def layer_mixer(self, layer: int) -> str:
        return "attention" if self.layer_mixers is None else self.layer_mixers[layer]

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """The layers that keep K/V in the paged cache."""
        return tuple(i for i in range(self.num_hidden_layers) if self.layer_mixer(i) == "attention")

    @property
    def is_hybrid(self) -> bool:
        """Whether some layer keeps a recurrent state per sequence instead of K/V."""
        return len(self.attention_layers) < self.num_hidden_layers

    def state_shapes(self, layer: int, tp: TensorParallel | None = None) -> tuple[tuple[int, ...], ...]:
        """The per-sequence state tensors of a recurrent layer (none for attention), of rank `tp`'s part
        under tensor parallelism: a short convolution's last conv_kernel − 1 inputs (its channels split);
        Gated DeltaNet's convolution inputs (q, k and v) and its recurrent matrix per value head (its heads split)."""
        mixer = self.layer_mixer(layer)
        if mixer == "short_conv":
            return ((self.conv_kernel - 1, span(self.hidden_size, tp)[1]),)
        if mixer == "gated_delta_net":
            keys, values = delta_net_heads(self.linear_num_key_heads, self.linear_num_value_heads,
                                           self.linear_value_heads_tiled, tp)
            conv = 2 * keys.count * self.linear_key_head_dim + values.count * self.linear_value_head_dim
            return ((self.conv_kernel - 1, conv), (values.count, self.linear_key_head_dim, self.linear_value_head_dim))
        return ()

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def state_bytes_per_sequence(self) -> int:
        """What one sequence's recurrent states take over all recurrent layers (float32; 0 but for hybrids)."""
        return self.rank_state_bytes(None)

    def rank_state_bytes(self, tp: TensorParallel | None) -> int:
        """One sequence's recurrent states on rank `tp` (the whole model's with None)."""
        return 4 * sum(math.prod(shape) for layer in range(self.num_hidden_layers)
                       for shape in self.state_shapes(layer, tp))

    def planned_state_bytes(self, ranks: int) -> int:
        """The most state bytes a sequence takes on any of `ranks` ranks: what every rank's slots are planned
        for, so that all hold as many as rank 0's scheduler hands out."""
        return max(self.rank_state_bytes(TensorParallel(rank, ranks) if ranks > 1 else None) for rank in range(ranks))

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None where it attends to the whole context."""
        if self.sliding_layers is None or self.sliding_layers[layer]:
            return self.sliding_window
        return None

    def uniform_window(self) -> int | None:
        """The sliding window every layer keeps to (Mistral v0.1), or None where some layer sees the whole
        context (Gemma 2's global layers) or none has a window."""
        windows = {self.layer_window(layer) for layer in range(self.num_hidden_layers)}
        return windows.pop() if len(windows) == 1 else None

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_layers

    def uses_local_rope(self, layer: int) -> bool:
        return self.local_rope_theta is not None and self.layer_window(layer) is not None

    def rotation_index(self, layer: int) -> int:
        """Which of the model's rotations (Transformer.rotations) a layer takes: the global one, the windowed
        layers' own base, or none (SmolLM3's NoPE layers: the identity, after the others)."""
        if layer in self.nope_layers:
            return 1 + (self.local_rope_theta is not None)
        return 1 if self.uses_local_rope(layer) else 0

    @property
    def latent_attention(self) -> bool:
        """Multi-head latent attention: one cached row a token (latent | rotary key), shared by the heads."""
        return self.kv_lora_rank > 0

    @property
    def kv_row_dim(self) -> int:
        """Values of one cached row: a head's K (or V), or latent attention's latent and rotary key."""
        return self.kv_lora_rank + self.head_dim if self.latent_attention else self.head_dim

    @property
    def kv_halves(self) -> int:
        """Rows a cached head holds a token: K and V, or latent attention's one row (its values are part of it)."""
        return 1 if self.latent_attention else 2

    @property
    def cached_kv_heads(self) -> int:
        return 1 if self.latent_attention else self.num_key_value_heads

    @property
    def rope_dims(self) -> int:
        """How many dims of each head rotate."""
        return self.rotary_dim or self.head_dim

    @property
    def scale(self) -> float:
        """What the attention scores are multiplied by."""
        return self.attention_scale if self.attention_scale is not None else self.head_dim**-0.5

    @property
    def num_parameters(self) -> int:
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0) + (h if self.o_proj_bias else 0)
        norm = 2 * h if self.norm_kind == "layer" else h
        norms = (2 + 2 * (self.sandwich_norms and self.pre_norms)) * norm
        attn += (q + kv if self.qk_norm_whole else 2 * self.head_dim) if self.qk_norm else 0
        mlps = sum(self._mlp_parameters(i) for i in range(self.num_hidden_layers))
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        embedding = self.vocab_size * h + (norm if self.embedding_norm else 0)
        attn += h * q if self.attention_output_gate else 0
        attn = self._latent_attention_parameters() if self.latent_attention else attn
        mixers = sum(attn if self.layer_mixer(i) == "attention" else self._mixer_parameters(self.layer_mixer(i))
                     for i in range(self.num_hidden_layers))
        return embedding + self.num_hidden_layers * norms + mixers + mlps + norm + head

    def _mixer_parameters(self, mixer: str) -> int:
        h = self.hidden_size
        if mixer == "short_conv":
            return 4 * h * h + h * self.conv_kernel + (5 * h if self.conv_bias else 0)
        keys, values, heads = (self.linear_num_key_heads * self.linear_key_head_dim, self.linear_value_dim,
                               self.linear_num_value_heads)
        conv = 2 * keys + values
        return h * (conv + values + 2 * heads) + conv * self.conv_kernel + 2 * heads + self.linear_value_head_dim \
            + values * h

    def _latent_attention_parameters(self) -> int:
        h, heads, rank, rope, q_rank = (self.hidden_size, self.num_attention_heads, self.kv_lora_rank, self.head_dim,
                                        self.q_lora_rank)
        q = heads * (self.qk_nope_head_dim + rope)
        queries = h * q_rank + q_rank + q_rank * q if q_rank else h * q
        biases = (q_rank if q_rank else 0) + rank + rope + h if self.attention_bias else 0
        return (queries + h * (rank + rope) + rank + rank * heads * (self.qk_nope_head_dim + self.v_head_dim)
                + heads * self.v_head_dim * h + biases)

    def _check_routing(self) -> None:
        if self.moe_scoring not in MOE_SCORINGS:
            raise ConfigError(f"model config: expert scoring {self.moe_scoring!r} is not one of {', '.join(MOE_SCORINGS)}")
        groups, chosen = self.moe_groups, self.moe_topk_groups
        if not (isinstance(groups, int) and isinstance(chosen, int) and 0 < chosen <= groups):
            raise ConfigError(f"model config: expert groups must be positive integers, the chosen ones at most all "
                              f"(got {chosen!r} of {groups!r})")
        if self.num_experts and (self.num_experts % groups or (groups > 1 and self.num_experts // groups < 2)
                                 or self.num_experts_per_tok > chosen * (self.num_experts // groups)):
            raise ConfigError(f"model config: {self.num_experts} experts in {groups} groups (each of at least 2, "
                              f"{chosen} chosen) cannot give {self.num_experts_per_tok} experts a token")
        if not (isinstance(self.routed_scaling_factor, (int, float)) and 0 < self.routed_scaling_factor < math.inf):
            raise ConfigError(f"model config: routed_scaling_factor must be a positive finite number, "
                              f"got {self.routed_scaling_factor!r}")

    def _mlp_parameters(self, layer: int) -> int:
        h = self.hidden_size
        if not self.is_moe_layer(layer):
            size, matrices = self.intermediate_size, 3 if self.gated_mlp else 2
            biases = (matrices - 1) * size + h if self.mlp_bias else 0
            return matrices * h * size + biases
        shared = 3 * h * self.shared_expert_intermediate_size
        if self.shared_expert_intermediate_size and self.shared_expert_gate:
            shared += h
        return self.num_experts * (3 * h * self.moe_intermediate_size + h) + shared + self.num_experts * self.moe_expert_bias


# q8_0: llama.cpp's 8-bit blocks (32 int8 values and a float16 scale), 1.06 bytes a value.
KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16", "q8_0")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV pool: planned once from a memory budget."""

    block_size: int = 16
    kv_cache_memory_bytes: int = 512 * 1024**2
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # auto: float16 for packed weights on the CPU, else the model's dtype (llm_engine.auto_kv_dtype)
    # Hybrid models' prefix cache: their recurrent states saved every this many blocks (engine/state_snapshots.py).
    state_snapshot_interval: int = 16

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv cache dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if not isinstance(self.block_size, int) or not 1 <= self.block_size <= 1024:
            raise ConfigError(f"block_size must be an integer in [1, 1024], got {self.block_size!r}")
        if not isinstance(self.kv_cache_memory_bytes, int) or self.kv_cache_memory_bytes <= 0:
            raise ConfigError(f"kv cache memory must be a positive number of bytes, got {self.kv_cache_memory_bytes!r}")
        interval = self.state_snapshot_interval
        if not isinstance(interval, int) or isinstance(interval, bool) or not 1 <= interval <= 2**16:
            raise ConfigError(f"state snapshot interval must be an integer in [1, 65536] blocks, "
                              f"got {self.state_snapshot_interval!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits: a token budget shared by decodes and prefill chunks, and a sequence cap."""

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    enable_chunked_prefill: bool = True
    max_model_len: int | None = None  # None: the model's own context length

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise ConfigError(f"max_model_len must be a positive integer, got {self.max_model_len!r}")


ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton")  # pagedllm.attention.BACKENDS, and auto
# auto: GGUF matrices stay in their packed formats, Hugging Face weights stay float;
# none: everything float; int8 / int4: Hugging Face float weights quantised at load (Q8_0 / Q4_1).
QUANTIZATION_CHOICES = ("auto", "none", "int8", "int4")
SPECULATIVE_METHODS = ("ngram", "draft_model")
DTYPES = ("float32", "bfloat16", "float16")  # the model's compute dtype (LLMEngine maps each to torch's)


@dataclass(frozen=True)
class SpeculativeConfig:
    """Draft tokens checked by the target model in one pass. Used for greedy requests; sampled
    requests decode one token at a time. "ngram" looks the drafts up in the prompt; "draft_model"
    asks a smaller model with the same vocabulary (`model`), which has its own KV cache."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4  # longest suffix n-gram looked up
    prompt_lookup_min: int = 1
    model: str | None = None  # the draft model (GGUF file or Hugging Face folder), for "draft_model"
    draft_kv_cache_memory_bytes: int = 64 * 2**20

    def __post_init__(self) -> None:
        if self.model is not None and self.method == "ngram":
            object.__setattr__(self, "method", "draft_model")  # vLLM's rule: a draft model implies the method
        if self.method not in SPECULATIVE_METHODS:
            raise ConfigError(f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.method!r}")
        if self.method == "draft_model" and not self.model:
            raise ConfigError("speculative method draft_model needs a draft model path")
        if not isinstance(self.draft_kv_cache_memory_bytes, int) or self.draft_kv_cache_memory_bytes < 1:
            raise ConfigError(f"draft_kv_cache_memory_bytes must be a positive integer, "
                              f"got {self.draft_kv_cache_memory_bytes!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ConfigError("prompt_lookup_min must not exceed prompt_lookup_max")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters (pagedllm.lora): those loaded at start, and the limits on all of them."""

    modules: tuple[tuple[str, str], ...] = ()  # (name, path) of each adapter loaded at start
    max_loras: int = 4  # adapters loaded at once, so also the most that one batch step mixes
    max_lora_rank: int = 64

    def __post_init__(self) -> None:
        for name in ("max_loras", "max_lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if len(self.modules) > self.max_loras:
            raise ConfigError(f"{len(self.modules)} LoRA modules given, more than max_loras ({self.max_loras})")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None: the default model (SmolLM2-135M-Instruct, Q4_1 GGUF)
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    # "auto": a C++ kernel for decode attention on the CPU when it builds; "torch": plain torch ops only.
    attention_backend: str = "auto"
    quantization: str = "auto"
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig | None = None
    tensor_parallel_size: int = 1  # processes the model is split over (pagedllm.distributed)
    # The device of each rank (empty: rank r on cuda:r for "cuda", else `device` for all).
    tensor_parallel_devices: tuple[str, ...] = ()
    enforce_eager: bool = False  # on a GPU, run decode steps eagerly instead of replaying CUDA graphs
    lora: LoRAConfig | None = None  # None: no LoRA adapters

    def __post_init__(self) -> None:
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                              f"got {self.attention_backend!r}")
        if self.quantization not in QUANTIZATION_CHOICES:
            raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)}, "
                              f"got {self.quantization!r}")


def build_engine_config(model: str | None = None, *, device: str = "cpu", dtype: str = "float32",
                        kv_cache_memory: int = CacheConfig.kv_cache_memory_bytes, block_size: int = 16,
                        max_num_batched_tokens: int = 512, max_num_seqs: int = 64, enable_chunked_prefill: bool = True,
                        enable_prefix_caching: bool = True, max_model_len: int | None = None, seed: int = 0,
                        attention_backend: str = "auto", quantization: str = "auto", kv_cache_dtype: str = "auto",
                        speculative_config: SpeculativeConfig | dict | None = None,
                        tensor_parallel_size: int = 1, enforce_eager: bool = False, enable_lora: bool = False,
                        lora_modules: dict[str, str] | None = None, max_loras: int = LoRAConfig.max_loras,
                        max_lora_rank: int = LoRAConfig.max_lora_rank,
                        state_snapshot_interval: int = CacheConfig.state_snapshot_interval) -> EngineConfig:
    """The engine options every front end takes (LLM, infer, the CLI), as one frozen EngineConfig.
    LoRA is on with `enable_lora` or any `lora_modules` (name → adapter path)."""
    lora = (LoRAConfig(tuple((lora_modules or {}).items()), max_loras, max_lora_rank)
            if enable_lora or lora_modules else None)
    return EngineConfig(
        model=model, device=device, dtype=dtype, seed=seed, attention_backend=attention_backend,
        quantization=quantization, tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager, lora=lora,
        speculative=SpeculativeConfig(**speculative_config) if isinstance(speculative_config, dict)
        else speculative_config,
        cache=CacheConfig(block_size=block_size, kv_cache_memory_bytes=kv_cache_memory,
                          enable_prefix_caching=enable_prefix_caching, kv_cache_dtype=kv_cache_dtype,
                          state_snapshot_interval=state_snapshot_interval),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                  enable_chunked_prefill=enable_chunked_prefill, max_model_len=max_model_len))
