"""Model families as data. A new family is a FamilySpec here, not new model code.

A spec says which shared parts a family uses (biases, norms, q/k norms, activation, embedding
scale, windows) and how llama.cpp stores it (tensor names, rotary row order, norm offsets); the
numbers of one model (sizes, eps, rope bases, caps) live in its ModelConfig.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PagedLLMError, shown


class UnsupportedModelError(PagedLLMError, ValueError):
    """The model's architecture is not one pagedllm knows."""


@dataclass(frozen=True)
class FamilySpec:
    name: str
    hf_architectures: tuple[str, ...]
    gguf_architectures: tuple[str, ...] = ()
    example: str = ""  # a model of the family on the Hugging Face hub (for the README's table)
    attention_bias: bool = False  # q/k/v projections carry a bias
    sliding_window: bool = False  # the HF config's `sliding_window` applies to every layer
    # llama.cpp's converter reorders the rows of Q and K for its "normal" (interleaved) rope
    # on some architectures; the GGUF loader undoes it for those.
    gguf_qk_permuted: bool = True
    # The parts a family chooses (see ModelConfig).
    norm_offset: float = 0.0  # Gemma's (1 + w); llama.cpp's converter stores such norms with the 1 added
    qk_norm: bool = False
    qk_norm_after_rope: bool = False  # Hunyuan norms q and k after rotating them
    qk_norm_whole: bool = False  # OLMo 2's q/k norms span the whole projection
    sandwich_norms: bool = False
    pre_norms: bool = True  # OLMo 2: no norm on a sub-layer's input, only on its output
    scale_embeddings: bool = False  # embeddings × √hidden
    hidden_act: str = "silu"  # what GGUF files imply; a Hugging Face config names its own
    # llama.cpp tensor names that mean something else in this family (llama.cpp name, HF name).
    gguf_renames: tuple[tuple[str, str], ...] = ()
    # llama.cpp's default sliding-window pattern for the architecture (every n-th layer global), when
    # a file has a window and no pattern key; 0: every layer is windowed.
    gguf_swa_pattern: int = 0
    gguf_local_rope_theta: float | None = None  # llama.cpp's windowed-layer rope base, when the file has none
    # llama.cpp scales a model of this many layers' queries by (hidden / heads) ** -0.5, not head_dim's
    # (Gemma 2/3 27B, after gemma_pytorch).
    gguf_hidden_scale_layers: int = 0
    # The checkpoint stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj` (Phi-3); the
    # loaders split them into the canonical names.
    fused_checkpoint: bool = False
    # Routed experts in place of the MLP (models of the family that have `num_experts`); the top-k
    # weights renormalised where the checkpoint does not say (Mixtral always; llama.cpp's rule per
    # architecture for GGUF files).
    moe: bool = False
    norm_topk_prob: bool = False
    shared_expert_gate: bool = True  # a shared expert scaled by sigmoid(gate) (Qwen2-MoE), not as it is (GLM-4.5)
    # GLM-4.5 / DeepSeek V3 routing: sigmoid scores with a per-expert choice bias (a config's `scoring_func`
    # overrides the scoring; GGUF files say both).
    moe_scoring: str = "softmax"
    moe_expert_bias: bool = False
    # Checkpoint names → canonical ones: (regular expression, replacement), applied in order
    # (Mixtral's block_sparse_moe.experts.N.w1 → mlp.experts.N.gate_proj).
    hf_renames: tuple[tuple[str, str], ...] = ()
    # Rotary pairs are (2i, 2i + 1) in the checkpoint's q/k rows (GLM), in both formats.
    rope_interleaved: bool = False
    # BLOOM's parts: LayerNorm, a norm after the embeddings, a plain MLP, biases everywhere.
    norm_kind: str = "rms"
    embedding_norm: bool = False
    gated_mlp: bool = True
    mlp_bias: bool = False
    o_proj_bias: bool = False
    # The Hugging Face checkpoint's fused q/k/v rows go head by head ([heads, 3, head_dim], BLOOM).
    hf_qkv_per_head: bool = False
    position_encoding: str = "rope"
    # Models of this many layers use ALiBi instead (Baichuan-13B, by llama.cpp's rule; 0: none).
    alibi_layers: int = 0
    # The output head's rows are normalised to unit length (Baichuan 2's NormHead) in models whose
    # vocabulary has this size (0: never).
    normalized_head_vocab: int = 0
    attention_output_gate: bool = False  # q_proj also gives each head a sigmoid gate on its output (Qwen3.5)
    attention_sinks: bool = False  # a learned per-head logit in each softmax (gpt-oss)
    router_bias: bool = False  # the MoE router's logits have a bias (gpt-oss)
    # The Hugging Face checkpoint stacks each layer's experts in one tensor per projection, gate and up
    # interleaved ([experts, in, 2·out], gpt-oss; its MXFP4 form as _blocks / _scales): the loader unstacks them.
    hf_stacked_experts: bool = False
    # Gated DeltaNet's input projections stored per key-head group, [q k v z] and [b a] (Qwen3-Next): the
    # Hugging Face loader regroups them as Qwen3.5's in_proj_qkv / _z / _b / _a.
    hf_grouped_delta_net: bool = False
    # A hybrid's recurrent mixer as llama.cpp's files describe it ("short_conv", "gated_delta_net"; "" for
    # none), and whether its converter tiles Gated DeltaNet's value heads (Qwen3.5) rather than keeping them
    # grouped by key head (Qwen3-Next).
    gguf_mixer: str = ""
    gguf_value_heads_tiled: bool = False
    # llama.cpp's fixed NoPE pattern for the architecture: every n-th layer has no rotary positions (SmolLM3: 4).
    gguf_nope_layer_step: int = 0
    # In a model with windows, the layers without one have no rotary positions (EXAONE 4's global layers).
    nope_unwindowed: bool = False
    # llama.cpp names of whole-model tensors that mean something else in this family (LFM2's final norm).
    gguf_global_renames: tuple[tuple[str, str], ...] = ()

    def model_parts(self) -> dict[str, object]:
        """The ModelConfig fields the family fixes, whatever its checkpoint says."""
        return {"norm_offset": self.norm_offset, "qk_norm": self.qk_norm, "sandwich_norms": self.sandwich_norms,
                "qk_norm_after_rope": self.qk_norm_after_rope, "qk_norm_whole": self.qk_norm_whole,
                "pre_norms": self.pre_norms,
                "rope_interleaved": self.rope_interleaved, "norm_kind": self.norm_kind,
                "embedding_norm": self.embedding_norm, "gated_mlp": self.gated_mlp, "o_proj_bias": self.o_proj_bias,
                "attention_output_gate": self.attention_output_gate, "shared_expert_gate": self.shared_expert_gate,
                "attention_sinks": self.attention_sinks, "router_bias": self.router_bias}

    def nope_layers(self, layers: int, sliding_layers: tuple[bool, ...] | None, windowed: bool) -> tuple[int, ...]:
        """The layers without rotary positions that the family's rule gives (llama.cpp knows no other): every
        gguf_nope_layer_step-th, or (nope_unwindowed) the unwindowed layers of a model with windows."""
        if self.gguf_nope_layer_step:
            return tuple(i for i in range(layers) if (i + 1) % self.gguf_nope_layer_step == 0)
        if self.nope_unwindowed and windowed and sliding_layers is not None:
            return tuple(i for i, sliding in enumerate(sliding_layers) if not sliding)
        return ()

    def model_shape_parts(self, layers: int, vocab_size: int) -> dict[str, object]:
        """The ModelConfig fields the family decides from a model's size."""
        alibi = self.position_encoding == "alibi" or layers == self.alibi_layers
        return {"position_encoding": "alibi" if alibi else self.position_encoding,
                "normalized_head": vocab_size == self.normalized_head_vocab}


# Gemma 2/3: llama.cpp's ffn_norm is the norm before the MLP, two more follow the sub-layers.
_GEMMA_SANDWICH = (("ffn_norm", "pre_feedforward_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
                   ("post_ffw_norm", "post_feedforward_layernorm"))

# GLM-4's norms, as Gemma 2/3's: after attention, before and after the MLP (its pre-MLP one is
# named post_attention_layernorm).
_GLM4_NORMS = ((r"\.post_attention_layernorm\.", ".pre_feedforward_layernorm."),
               (r"\.post_self_attn_layernorm\.", ".post_attention_layernorm."),
               (r"\.post_mlp_layernorm\.", ".post_feedforward_layernorm."))

# The hybrid mixers' tensors in llama.cpp's files (names after blk.N.; one with its suffix is matched whole).
SHORT_CONV_RENAMES = (("shortconv.in_proj", "conv.in_proj"), ("shortconv.conv", "conv.conv"),
                      ("shortconv.out_proj", "conv.out_proj"))
DELTA_NET_RENAMES = (("attn_qkv", "linear_attn.in_proj_qkv"), ("attn_gate", "linear_attn.in_proj_z"),
                     ("ssm_beta", "linear_attn.in_proj_b"), ("ssm_alpha", "linear_attn.in_proj_a"),
                     ("ssm_ba", "linear_attn.in_proj_ba"), ("ssm_in", "linear_attn.in_proj_qkvz"),
                     ("ssm_conv1d", "linear_attn.conv1d"), ("ssm_dt.bias", "linear_attn.dt_bias"),
                     ("ssm_a", "linear_attn.A_log"), ("ssm_norm", "linear_attn.norm"),
                     ("ssm_out", "linear_attn.out_proj"), ("post_attention_norm", "post_attention_layernorm"))
# Latent attention's tensors in llama.cpp's deepseek2 files (kv_b_proj split in two: models/loaders/gguf_latent.py).
LATENT_RENAMES = (("attn_q_a", "self_attn.q_a_proj"), ("attn_q_a_norm", "self_attn.q_a_layernorm"),
                  ("attn_q_b", "self_attn.q_b_proj"), ("attn_kv_a_mqa", "self_attn.kv_a_proj_with_mqa"),
                  ("attn_kv_a_norm", "self_attn.kv_a_layernorm"), ("attn_k_b.weight", "self_attn.k_b_proj.weight"),
                  ("attn_v_b.weight", "self_attn.v_b_proj.weight"))
# Qwen3.5's and Qwen3-Next's shared parts: (1 + w) norms, q/k norms, attention gated per head; in llama.cpp's
# files rotary rows in the checkpoint's order, Gated DeltaNet's tensors under ssm_* names.
_QWEN3_5_PARTS = dict(norm_offset=1.0, qk_norm=True, attention_output_gate=True, gguf_qk_permuted=False,
                      gguf_mixer="gated_delta_net", gguf_renames=DELTA_NET_RENAMES)

# OLMo 2's and EXAONE 4's layers: norms on each sub-layer's output only (llama.cpp's post_attention_norm and
# post_ffw_norm), q/k norms, NEOX rope in llama.cpp's files, every 4th layer global where there are windows.
_OUTPUT_NORM_PARTS = dict(gguf_qk_permuted=False, qk_norm=True, sandwich_norms=True, pre_norms=False, gguf_swa_pattern=4,
                          gguf_renames=(("post_attention_norm", "post_attention_layernorm"),
                                        ("post_ffw_norm", "post_feedforward_layernorm")))

FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        name="llama",
        # SmolLM2, Llama 2/3, Yi, DeepSeek dense and Vicuna all ship as LlamaForCausalLM.
        hf_architectures=("LlamaForCausalLM", "YiForCausalLM"),
        gguf_architectures=("llama",),
        example="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    FamilySpec(
        name="qwen2",
        hf_architectures=("Qwen2ForCausalLM",),
        gguf_architectures=("qwen2",),
        example="Qwen/Qwen2.5-0.5B-Instruct",
        attention_bias=True,
        gguf_qk_permuted=False,  # llama.cpp runs qwen2 with NEOX rope: rows stay in HF order
    ),
    FamilySpec(
        name="mistral",
        # llama.cpp writes Mistral models as GGUF architecture "llama" (+ a sliding-window key).
        hf_architectures=("MistralForCausalLM",),
        example="mistralai/Mistral-7B-Instruct-v0.3",
        sliding_window=True,
    ),
    FamilySpec(
        name="ministral",
        # Ministral 8B (2410): Mistral's layers with windows on some layers only (its layer_types), not every one;
        # llama.cpp writes it as architecture "llama" with one window flag a layer.
        hf_architectures=("MinistralForCausalLM",),
        example="mistralai/Ministral-8B-Instruct-2410",
    ),
    FamilySpec(
        name="ministral3",
        # Ministral 3 (3B, 8B, 14B; 2025-12): Mistral's layers, YaRN, and queries scaled up past the original context
        # (1 + β · ln(1 + ⌊position / original⌋), llama.cpp's attention temperature).
        hf_architectures=("Ministral3ForCausalLM",),
        gguf_architectures=("mistral3",),
        example="mistralai/Ministral-3-8B-Instruct-2512",
    ),
    FamilySpec(
        name="qwen3",
        hf_architectures=("Qwen3ForCausalLM",),
        gguf_architectures=("qwen3",),
        example="Qwen/Qwen3-0.6B",
        gguf_qk_permuted=False,
        qk_norm=True,
    ),
    FamilySpec(
        name="phi3",
        hf_architectures=("Phi3ForCausalLM",),
        gguf_architectures=("phi3",),
        example="microsoft/Phi-3-mini-4k-instruct",
        sliding_window=True,
        gguf_qk_permuted=False,
        fused_checkpoint=True,
        gguf_renames=(("attn_qkv", "self_attn.qkv_proj"), ("ffn_up", "mlp.gate_up_proj")),
    ),
    FamilySpec(
        name="mixtral",
        # llama.cpp writes Mixtral as GGUF architecture "llama" with an expert count.
        hf_architectures=("MixtralForCausalLM",),
        gguf_architectures=("llama",),
        example="mistralai/Mixtral-8x7B-Instruct-v0.1",
        sliding_window=True,
        moe=True,
        norm_topk_prob=True,
        hf_renames=((r"\.block_sparse_moe\.", ".mlp."), (r"\.w1\.", ".gate_proj."), (r"\.w3\.", ".up_proj."),
                    (r"\.w2\.", ".down_proj.")),
    ),
    FamilySpec(
        name="qwen2_moe",
        hf_architectures=("Qwen2MoeForCausalLM",),
        gguf_architectures=("qwen2moe",),
        example="Qwen/Qwen1.5-MoE-A2.7B-Chat",
        attention_bias=True,
        gguf_qk_permuted=False,
        moe=True,
    ),
    FamilySpec(
        name="qwen3_moe",
        hf_architectures=("Qwen3MoeForCausalLM",),
        gguf_architectures=("qwen3moe",),
        example="Qwen/Qwen3-30B-A3B",
        gguf_qk_permuted=False,
        qk_norm=True,
        moe=True,
        norm_topk_prob=True,
    ),
    FamilySpec(
        name="glm",
        # transformers' port of ChatGLM / GLM-4-9B; llama.cpp writes it as "chatglm".
        hf_architectures=("GlmForCausalLM",),
        gguf_architectures=("chatglm",),
        example="THUDM/glm-4-9b-chat-hf",
        attention_bias=True,
        gguf_qk_permuted=False,  # llama.cpp rotates interleaved pairs, as the checkpoint
        fused_checkpoint=True,
        rope_interleaved=True,
        gguf_renames=(("ffn_up", "mlp.gate_up_proj"),),
    ),
    FamilySpec(
        name="glm4",
        hf_architectures=("Glm4ForCausalLM",),
        gguf_architectures=("glm4",),
        example="THUDM/GLM-4-9B-0414",
        attention_bias=True,
        gguf_qk_permuted=False,
        fused_checkpoint=True,
        rope_interleaved=True,
        sandwich_norms=True,
        hf_renames=_GLM4_NORMS,
        gguf_renames=_GEMMA_SANDWICH + (("ffn_up", "mlp.gate_up_proj"),),
    ),
    FamilySpec(
        name="granite",
        # IBM's Granite 3: llama layers with multipliers — embeddings, residual branches, the attention scale, and
        # logits divided (the config's *_multiplier and logits_scaling; llama.cpp's *_scale keys).
        hf_architectures=("GraniteForCausalLM",),
        gguf_architectures=("granite",),
        example="ibm-granite/granite-3.3-2b-instruct",
    ),
    FamilySpec(
        name="smollm3",
        # Hugging Face's SmolLM3: llama layers, every 4th without rotary positions (NoPE; the config lists them).
        hf_architectures=("SmolLM3ForCausalLM",),
        gguf_architectures=("smollm3",),
        example="HuggingFaceTB/SmolLM3-3B",
        gguf_nope_layer_step=4,
    ),
    FamilySpec(
        name="hunyuan_dense",
        # Tencent's Hunyuan dense models: llama layers whose per-head q/k norms come after the rotation.
        hf_architectures=("HunYuanDenseV1ForCausalLM",),
        gguf_architectures=("hunyuan-dense",),
        example="tencent/Hunyuan-7B-Instruct",
        gguf_qk_permuted=False,
        qk_norm=True,
        qk_norm_after_rope=True,
        hf_renames=((r"\.query_layernorm\.", ".q_norm."), (r"\.key_layernorm\.", ".k_norm.")),
    ),
    FamilySpec(
        name="seed_oss",
        # ByteDance's Seed-OSS: llama layers whose q/k/v and o projections may carry biases (its config says).
        hf_architectures=("SeedOssForCausalLM",),
        gguf_architectures=("seed_oss",),
        example="ByteDance-Seed/Seed-OSS-36B-Instruct",
        gguf_qk_permuted=False,
        gguf_renames=(("post_attention_norm", "post_attention_layernorm"),),  # llama.cpp's name for the pre-MLP norm
    ),
    FamilySpec(
        name="ernie4_5",
        # Baidu's ERNIE 4.5 dense models: llama layers, rotary pairs (2i, 2i + 1), biases where `use_bias` says.
        hf_architectures=("Ernie4_5ForCausalLM",),
        gguf_architectures=("ernie4_5",),
        example="baidu/ERNIE-4.5-0.3B-PT",
        gguf_qk_permuted=False,
        rope_interleaved=True,
    ),
    FamilySpec(
        name="ernie4_5_moe",
        # ERNIE 4.5 MoE (21B-A3B, 300B-A47B): ERNIE 4.5's layers; routed experts by softmax scores with a choice bias,
        # renormalised, plain shared experts; the first layer (moe_layer_start_index) dense.
        hf_architectures=("Ernie4_5_MoeForCausalLM",),
        gguf_architectures=("ernie4_5-moe",),
        example="baidu/ERNIE-4.5-21B-A3B-PT",
        gguf_qk_permuted=False,
        rope_interleaved=True,
        moe=True,
        norm_topk_prob=True,
        shared_expert_gate=False,
        moe_expert_bias=True,
        hf_renames=((r"\.mlp\.shared_experts\.", ".mlp.shared_expert."),
                    (r"\.mlp\.moe_statics\.e_score_correction_bias$", ".mlp.expert_bias")),
        gguf_renames=(("exp_probs_b.bias", "mlp.expert_bias"),),
    ),
    FamilySpec(
        name="glm4_moe",
        # GLM-4.5 / 4.6 / 4.7 (and -Air): llama attention (biases, partial rotary in NeoX pairs, optional q/k norms),
        # routed experts by sigmoid scores with a choice bias, one plain shared expert, the first layers dense.
        hf_architectures=("Glm4MoeForCausalLM",),
        gguf_architectures=("glm4moe",),
        example="zai-org/GLM-4.5-Air",
        attention_bias=True,
        gguf_qk_permuted=False,
        moe=True,
        norm_topk_prob=True,
        shared_expert_gate=False,
        moe_scoring="sigmoid",
        moe_expert_bias=True,
        hf_renames=((r"\.mlp\.shared_experts\.", ".mlp.shared_expert."),
                    (r"\.mlp\.gate\.e_score_correction_bias$", ".mlp.expert_bias")),
        # llama.cpp names the norm before the MLP post_attention_norm in this architecture
        gguf_renames=(("exp_probs_b.bias", "mlp.expert_bias"), ("post_attention_norm", "post_attention_layernorm")),
    ),
    FamilySpec(
        name="olmo2",
        # AI2's OLMo 2 and OLMo 3: llama's parts, but each sub-layer's output normed instead of its input, and the
        # q/k norms over the whole projections; OLMo 3 windows three layers in four (its layer_types).
        hf_architectures=("Olmo2ForCausalLM", "Olmo3ForCausalLM"),
        gguf_architectures=("olmo2",),
        example="allenai/OLMo-2-1124-7B-Instruct (also allenai/Olmo-3-7B-Instruct)",
        qk_norm_whole=True,
        **_OUTPUT_NORM_PARTS,  # llama.cpp's OLMo 3 default window pattern: every 4th layer global
    ),
    FamilySpec(
        name="exaone4",
        # LG's EXAONE 4.0: OLMo 2's norms (each sub-layer's output only) with per-head q/k norms; three layers in four
        # windowed, and where there are windows the global layers have no rotary positions.
        hf_architectures=("Exaone4ForCausalLM",),
        gguf_architectures=("exaone4",),
        example="LGAI-EXAONE/EXAONE-4.0-1.2B (also EXAONE-4.0-32B)",
        nope_unwindowed=True,
        **_OUTPUT_NORM_PARTS,
    ),
    FamilySpec(
        name="gpt_oss",
        # OpenAI's gpt-oss-20b / -120b: llama attention with biases and a learned sink logit per head, sliding
        # windows (128) on every other layer, YaRN; every layer routed experts (softmax over the top-k logits of a
        # biased router; each expert biased, its SwiGLU clamped), stored MXFP4 in both file kinds.
        hf_architectures=("GptOssForCausalLM",),
        gguf_architectures=("gpt-oss",),
        example="openai/gpt-oss-20b",
        attention_bias=True,
        o_proj_bias=True,
        gguf_qk_permuted=False,  # llama.cpp runs it with NEOX rope
        moe=True,
        norm_topk_prob=True,  # softmax over the chosen experts' logits = the softmax's top-k renormalised
        mlp_bias=True,
        hidden_act="swiglu_oai",
        attention_sinks=True,
        router_bias=True,
        hf_stacked_experts=True,
        hf_renames=((r"\.mlp\.router\.", ".mlp.gate."),),
        gguf_renames=(("attn_sinks.weight", "self_attn.sinks"), ("post_attention_norm", "post_attention_layernorm")),
        gguf_swa_pattern=2,  # llama.cpp: the even layers windowed
    ),
    FamilySpec(
        name="deepseek",
        # DeepSeek V2 / V2-Lite / V3 / R1, Kimi K2, Moonlight: multi-head latent attention (layers/mla.py) and
        # DeepSeekMoE — V3's sigmoid routing with a choice bias in expert groups (V2's softmax, its groups scored by
        # their best expert, as the config's topk_method says), plain shared experts, the first layers dense.
        hf_architectures=("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"),
        gguf_architectures=("deepseek2",),
        example="deepseek-ai/DeepSeek-V3",
        gguf_qk_permuted=False,
        moe=True,
        norm_topk_prob=True,
        shared_expert_gate=False,
        moe_scoring="sigmoid",
        moe_expert_bias=True,
        hf_renames=((r"\.mlp\.shared_experts\.", ".mlp.shared_expert."),
                    (r"\.mlp\.gate\.e_score_correction_bias$", ".mlp.expert_bias")),
        gguf_renames=LATENT_RENAMES + (("exp_probs_b.bias", "mlp.expert_bias"),),
    ),
    FamilySpec(
        name="baichuan",
        # Baichuan 1 and 2, 7B (RoPE) and 13B (ALiBi); remote code, no transformers class.
        hf_architectures=("BaichuanForCausalLM", "BaiChuanForCausalLM"),
        gguf_architectures=("baichuan",),
        example="baichuan-inc/Baichuan2-7B-Chat",
        fused_checkpoint=True,
        hf_renames=((r"\.self_attn\.W_pack\.", ".self_attn.qkv_proj."),),
        alibi_layers=40,
        normalized_head_vocab=125696,
    ),
    FamilySpec(
        name="bloom",
        hf_architectures=("BloomForCausalLM",),
        gguf_architectures=("bloom",),
        example="bigscience/bloomz-560m",
        attention_bias=True,
        gguf_qk_permuted=False,  # no rotation
        fused_checkpoint=True,
        hf_qkv_per_head=True,
        norm_kind="layer",
        embedding_norm=True,
        gated_mlp=False,
        mlp_bias=True,
        o_proj_bias=True,
        position_encoding="alibi",
        hidden_act="gelu_tanh",
        hf_renames=((r"^(transformer\.)?h\.", "model.layers."),
                    (r"^(transformer\.)?word_embeddings_layernorm\.", "model.embed_layernorm."),
                    (r"^(transformer\.)?word_embeddings\.", "model.embed_tokens."),
                    (r"^(transformer\.)?ln_f\.", "model.norm."),
                    (r"\.self_attention\.query_key_value\.", ".self_attn.qkv_proj."),
                    (r"\.self_attention\.dense\.", ".self_attn.o_proj."),
                    (r"\.mlp\.dense_h_to_4h\.", ".mlp.up_proj."),
                    (r"\.mlp\.dense_4h_to_h\.", ".mlp.down_proj.")),
        gguf_renames=(("attn_qkv", "self_attn.qkv_proj"),),
    ),
    FamilySpec(
        name="gemma",
        hf_architectures=("GemmaForCausalLM",),
        gguf_architectures=("gemma",),
        example="google/gemma-2b-it",
        gguf_qk_permuted=False,
        norm_offset=1.0,
        scale_embeddings=True,
        hidden_act="gelu_tanh",
    ),
    FamilySpec(
        name="gemma2",
        hf_architectures=("Gemma2ForCausalLM",),
        gguf_architectures=("gemma2",),
        example="google/gemma-2-2b-it",
        gguf_qk_permuted=False,
        norm_offset=1.0,
        sandwich_norms=True,
        scale_embeddings=True,
        hidden_act="gelu_tanh",
        gguf_renames=_GEMMA_SANDWICH,
        gguf_swa_pattern=2,
        gguf_hidden_scale_layers=46,
    ),
    FamilySpec(
        name="gemma3",
        hf_architectures=("Gemma3ForCausalLM",),
        gguf_architectures=("gemma3",),
        example="google/gemma-3-1b-it",
        gguf_qk_permuted=False,
        norm_offset=1.0,
        qk_norm=True,
        sandwich_norms=True,
        scale_embeddings=True,
        hidden_act="gelu_tanh",
        gguf_renames=_GEMMA_SANDWICH,
        gguf_swa_pattern=6,
        gguf_local_rope_theta=10000.0,
        gguf_hidden_scale_layers=62,
    ),
    FamilySpec(
        # A hybrid: gated short convolutions (layers/short_conv.py) in most layers, attention with
        # per-head q/k norms in the rest; its checkpoint's names as the canonical llama-style ones.
        name="lfm2",
        hf_architectures=("Lfm2ForCausalLM",),
        gguf_architectures=("lfm2",),
        example="LiquidAI/LFM2-350M",
        qk_norm=True,
        gguf_qk_permuted=False,
        gguf_mixer="short_conv",
        gguf_renames=SHORT_CONV_RENAMES,
        gguf_global_renames=(("token_embd_norm.weight", "model.norm.weight"),),  # llama.cpp's name for it
        hf_renames=((r"\.operator_norm\.", ".input_layernorm."), (r"\.ffn_norm\.", ".post_attention_layernorm."),
                    (r"\.feed_forward\.w1\.", ".mlp.gate_proj."), (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
                    (r"\.feed_forward\.w2\.", ".mlp.down_proj."), (r"\.self_attn\.out_proj\.", ".self_attn.o_proj."),
                    (r"\.q_layernorm\.", ".q_norm."), (r"\.k_layernorm\.", ".k_norm."),
                    (r"^model\.embedding_norm\.", "model.norm.")),  # LFM2's final norm, despite its name
    ),
    FamilySpec(
        # LFM2's layers with routed experts after its first dense ones: sigmoid scores, a choice bias, no shared expert.
        name="lfm2_moe",
        hf_architectures=("Lfm2MoeForCausalLM",),
        gguf_architectures=("lfm2moe",),
        example="LiquidAI/LFM2-8B-A1B",
        qk_norm=True,
        gguf_qk_permuted=False,
        gguf_mixer="short_conv",
        gguf_renames=SHORT_CONV_RENAMES + (("exp_probs_b.bias", "mlp.expert_bias"),),
        gguf_global_renames=(("token_embd_norm.weight", "model.norm.weight"),),
        moe=True,
        norm_topk_prob=True,
        moe_scoring="sigmoid",
        moe_expert_bias=True,
        hf_renames=((r"\.operator_norm\.", ".input_layernorm."), (r"\.ffn_norm\.", ".post_attention_layernorm."),
                    (r"\.feed_forward\.", ".mlp."), (r"\.w1\.", ".gate_proj."), (r"\.w3\.", ".up_proj."),
                    (r"\.w2\.", ".down_proj."), (r"\.self_attn\.out_proj\.", ".self_attn.o_proj."),
                    (r"\.q_layernorm\.", ".q_norm."), (r"\.k_layernorm\.", ".k_norm."),
                    (r"^model\.embedding_norm\.", "model.norm.")),
    ),
    FamilySpec(
        # A hybrid: Gated DeltaNet (layers/gated_delta_net.py) in three of every four layers, gated
        # attention with (1 + w) q/k norms and a partial rotation in the rest.
        name="qwen3_5",
        hf_architectures=("Qwen3_5ForCausalLM",),
        gguf_architectures=("qwen35",),
        example="Qwen/Qwen3.5-0.8B",
        **_QWEN3_5_PARTS,
        gguf_value_heads_tiled=True,
    ),
    FamilySpec(
        # Qwen3.5's layers with routed experts and a sigmoid-gated shared expert in every layer.
        name="qwen3_5_moe",
        hf_architectures=("Qwen3_5MoeForCausalLM",),
        gguf_architectures=("qwen35moe",),
        example="Qwen/Qwen3.5-35B-A3B",
        **_QWEN3_5_PARTS,
        gguf_value_heads_tiled=True,
        moe=True,
        norm_topk_prob=True,
    ),
    FamilySpec(
        name="qwen3_next",
        hf_architectures=("Qwen3NextForCausalLM",),
        gguf_architectures=("qwen3next",),
        example="Qwen/Qwen3-Next-80B-A3B-Instruct",
        **_QWEN3_5_PARTS,
        moe=True,
        norm_topk_prob=True,  # transformers' default for it, and llama.cpp's rule for its files
        hf_grouped_delta_net=True,
    ),
)


def _supported(kind: str) -> str:
    names = sorted({a for f in FAMILIES for a in (f.hf_architectures if kind == "hf" else f.gguf_architectures)})
    return ", ".join(names)


def family_for_hf(architectures: list[str] | None) -> FamilySpec:
    for arch in architectures or []:
        for family in FAMILIES:
            if arch in family.hf_architectures:
                return family
    raise UnsupportedModelError(
        f"unsupported architecture {', '.join(architectures or ['(none given)'])}; "
        f"pagedllm supports: {_supported('hf')}"
    )


def family_for_gguf(architecture: str, experts: bool = False) -> FamilySpec:
    """The family of a GGUF architecture; one name can stand for a dense and a MoE family ("llama")."""
    candidates = [f for f in FAMILIES if architecture in f.gguf_architectures]
    for family in candidates:
        if family.moe == experts:
            return family
    if candidates:
        return candidates[0]
    raise UnsupportedModelError(
        f"unsupported GGUF architecture {shown(architecture)}; pagedllm supports: {_supported('gguf')}"
    )


def family_by_name(name: str) -> FamilySpec:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UnsupportedModelError(f"unknown family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")
