"""Shared fixtures: the default model, and tiny random models of every family built offline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pagedllm.models.loaders import default_model_path, read_model_config, ModelSource
from pagedllm.models.loaders.gguf_file import GGUFFile
from pagedllm.models.loaders.hf_loader import hf_weights
from pagedllm.tokenizer import load_tokenizer
from pagedllm.tools.convert import write_gguf
from pagedllm.tools.export import write_tokenizer_files

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.1)


def _tiny_configs():
    from transformers import (BloomConfig, Gemma2Config, Gemma3TextConfig, GemmaConfig, Glm4Config, Glm4MoeConfig,
                              GlmConfig, LlamaConfig, MistralConfig, MixtralConfig, Phi3Config, Qwen2Config,
                              Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig, SeedOssConfig, Ernie4_5Config,
                              SmolLM3Config, GraniteConfig, HunYuanDenseV1Config, Olmo3Config, Exaone4Config,
                              MinistralConfig, Ernie4_5_MoeConfig, Ministral3Config)

    gemma = dict(head_dim=16, query_pre_attn_scalar=16)  # llama.cpp scales by head_dim ** -0.5 (but for 27B)
    return {
        # llama-3 rope scaling, separate output embedding
        "llama": LlamaConfig(**TINY, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        # q/k/v biases, tied embeddings, multi-query attention
        "qwen2": Qwen2Config(**{**TINY, "num_key_value_heads": 1}, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        # a sliding window shorter than the test sequences
        "mistral": MistralConfig(**TINY, sliding_window=8, tie_word_embeddings=False),
        # windows on every other layer only (Mistral's apply to all)
        "ministral": MinistralConfig(**TINY, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                     tie_word_embeddings=False),
        # Ministral 3: YaRN, and queries × 1 + 0.5 · ln(1 + ⌊position / 8⌋) (the test prompts run past 8)
        "ministral3": Ministral3Config(**TINY, head_dim=16, tie_word_embeddings=False, rope_parameters={
            "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 8,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.5}),
        # per-head q/k norms, explicit head_dim
        "qwen3": Qwen3Config(**TINY, head_dim=16, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        # q/k/v and gate/up fused in the checkpoint; LongRoPE past 16 tokens (the prompts are longer), a window
        "phi3": Phi3Config(**TINY, pad_token_id=0, sliding_window=12, tie_word_embeddings=False, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
            "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [2.0 + 0.5 * i for i in range(8)]}),
        # 4 experts, 2 a token (renormalised); a window
        "mixtral": MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                                 tie_word_embeddings=False),
        # 6 experts of 32, 2 a token (not renormalised), a sigmoid-gated shared expert; q/k/v biases
        "qwen2_moe": Qwen2MoeConfig(**TINY, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=96, tie_word_embeddings=False),
        # 8 experts of 32, 3 a token (renormalised); q/k norms
        "qwen3_moe": Qwen3MoeConfig(**TINY, head_dim=16, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                                    norm_topk_prob=True, tie_word_embeddings=True),
        # interleaved rotary pairs on half of each head (of 32), q/k/v biases, gate/up fused in the checkpoint
        "glm": GlmConfig(**TINY, head_dim=32, pad_token_id=0, tie_word_embeddings=False),
        # + norms after attention and around the MLP; a quarter of each head rotates
        "glm4": Glm4Config(**TINY, head_dim=16, pad_token_id=0, tie_word_embeddings=False, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
        # GLM-4.5: 8 experts of 32 in 4 groups (the best 2 open), 3 a token by sigmoid scores plus a choice bias,
        # renormalised and scaled by 2.5; one plain shared expert; the first of 3 layers dense; q/k norms and
        # q/k/v biases; half of each head rotates (NeoX pairs)
        "glm4_moe": Glm4MoeConfig(**{**TINY, "num_hidden_layers": 3}, head_dim=16, n_routed_experts=8,
                                  num_experts_per_tok=3, moe_intermediate_size=32, n_shared_experts=1, n_group=4,
                                  topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5, use_qk_norm=True,
                                  attention_bias=True, tie_word_embeddings=False),
        # embeddings × 3, residual branches × 0.5, scores × 0.2, logits ÷ 2
        "granite": GraniteConfig(**TINY, embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2,
                                 logits_scaling=2.0, tie_word_embeddings=False),
        # per-head q/k norms after the rotation
        "hunyuan_dense": HunYuanDenseV1Config(**TINY, head_dim=16, tie_word_embeddings=False),
        # the last of 4 layers without rotary positions (NoPE), as llama.cpp's fixed step
        "smollm3": SmolLM3Config(**{**TINY, "num_hidden_layers": 4}, head_dim=16, no_rope_layer_interval=4, pad_token_id=0,
                                 tie_word_embeddings=True),
        # OLMo 3 (family olmo2): norms on each sub-layer's output only, q/k norms over the whole projections,
        # three layers in four windowed
        "olmo2": Olmo3Config(**{**TINY, "num_hidden_layers": 4}, sliding_window=8, tie_word_embeddings=False,
                             layer_types=["sliding_attention"] * 3 + ["full_attention"]),
        # EXAONE 4: OLMo 2's norms with per-head q/k norms; three layers in four windowed, the fourth without rotary
        "exaone4": Exaone4Config(**{**TINY, "num_hidden_layers": 4}, sliding_window=8, sliding_window_pattern=4,
                                 tie_word_embeddings=False),
        # q/k/v and o biases (its own flags)
        "seed_oss": SeedOssConfig(**TINY, head_dim=16, attention_bias=True, attention_out_bias=True,
                                  tie_word_embeddings=False),
        # rotary pairs (2i, 2i + 1), biases on every projection (one flag), tied embeddings
        "ernie4_5": Ernie4_5Config(**TINY, head_dim=16, use_bias=True, tie_word_embeddings=True),
        # ERNIE 4.5 MoE: 8 experts of 32, 3 a token by softmax scores with a choice bias, renormalised; a plain shared
        # expert; the first of 3 layers dense; rotary pairs (2i, 2i + 1)
        "ernie4_5_moe": Ernie4_5_MoeConfig(**{**TINY, "num_hidden_layers": 3}, head_dim=16, moe_num_experts=8, moe_k=3,
                                           moe_intermediate_size=32, moe_num_shared_experts=1, moe_layer_start_index=1,
                                           use_bias=False, tie_word_embeddings=False),
        # ALiBi (6 heads: not a power of two), LayerNorm with biases (one after the embeddings), a plain
        # GELU MLP with biases, q/k/v fused head by head in the checkpoint
        "bloom": BloomConfig(vocab_size=49152, hidden_size=96, n_layer=2, n_head=6, initializer_range=0.1,
                             layer_norm_epsilon=1e-5),
        # (1 + w) norms, GeGLU, embeddings × √hidden
        "gemma": GemmaConfig(**TINY, head_dim=16),
        # + norms around each sub-layer, soft-capped scores and logits, a window on every other layer
        "gemma2": Gemma2Config(**TINY, **gemma, sliding_window=8, attn_logit_softcapping=5.0,
                               final_logit_softcapping=3.0),
        # + q/k norms, windowed layers with their own (unscaled) rope base, linear scaling on the global ones
        "gemma3": Gemma3TextConfig(**TINY, **gemma, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                       "rope_theta": 1000000.0},
                                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    }


@dataclass
class TinyModel:
    family: str
    hf_dir: Path
    gguf_path: Path
    hf_model: torch.nn.Module


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def default_tokenizer_metadata(default_gguf) -> dict:
    return {k: v for k, v in GGUFFile(default_gguf).metadata.items() if k.startswith("tokenizer.")}


def _save_tokenizer(folder: Path, default_gguf: Path) -> None:
    """The default model's tokenizer as Hugging Face files (tokenizer.json, tokenizer_config.json)."""
    source = ModelSource("gguf", default_gguf)
    write_tokenizer_files(source, load_tokenizer(source), folder)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, default_gguf, default_tokenizer_metadata) -> dict[str, TinyModel]:
    from transformers import AutoModelForCausalLM

    models = {}
    for family, config in _tiny_configs().items():
        torch.manual_seed(1234)
        # eager: transformers' SDPA path drops Gemma 2's soft-capping
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():  # norms away from their initial ones (Gemma's 0 would hide a missing 1 + w)
            for name, param in hf.named_parameters():
                if "norm" in name or name.endswith(".bias"):
                    param.add_(torch.randn_like(param) * 0.1)
            for name, buffer in hf.named_buffers():  # DeepSeek-style routers' choice bias starts at zero
                if name.endswith("e_score_correction_bias"):
                    buffer.add_(torch.rand_like(buffer) * 0.2)
                    # and a random sigmoid router scores every expert near ½: sharpened, as trained ones are,
                    # so that a packed file's slightly different inputs seldom tip a near-tie
                    hf.get_parameter(name.replace("e_score_correction_bias", "weight")).mul_(4)
        folder = tmp_path_factory.mktemp(f"tiny-{family}")
        hf.save_pretrained(folder)
        _save_tokenizer(folder, default_gguf)
        ours, _ = read_model_config(ModelSource("hf", folder))
        gguf_path = folder.parent / f"tiny-{family}.gguf"
        write_gguf(gguf_path, ours, hf_weights(folder), default_tokenizer_metadata)
        models[family] = TinyModel(family, folder, gguf_path, hf)
    return models


@pytest.fixture(autouse=True, scope="session")
def _private_job_board(tmp_path_factory):
    """Batch jobs run by the tests publish their progress to a board of their own, not the user's."""
    import os

    os.environ["PAGEDLLM_JOBS_DIR"] = str(tmp_path_factory.mktemp("jobs"))
    yield
