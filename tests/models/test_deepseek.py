"""DeepSeek V2 / V3 (issue 37): multi-head latent attention with its latent pool, attended in the latent space,
and DeepSeekMoE routing — against transformers on tiny random models, through the engine and llama.cpp's files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.attention import kv_bytes_per_token
from pagedllm.errors import PagedLLMError
from pagedllm.models.loaders import ModelSource, load_model
from helpers import (assert_chunked_forked_and_cached_generation, assert_packed_logits_close, greedy_reference,
                     prefill_logits, random_prompt)



@pytest.fixture(scope="module")
def tiny_deepseek(tmp_path_factory, default_gguf):
    """3 layers (the first dense) of 4 heads: queries through a rank-48 path, a latent of 32 and a rotary key of 8
    cached a token, no-rope query/key parts of 16, values of 12; 8 experts of 32 in 4 groups (the best 2 open),
    3 a token by sigmoid scores plus a choice bias, renormalised and scaled by 2.5; a plain shared expert."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    from conftest import TINY, _save_tokenizer

    config = DeepseekV3Config(**{**TINY, "num_hidden_layers": 3, "num_key_value_heads": 4}, q_lora_rank=48,
                              kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                              n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, n_shared_experts=1,
                              n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
                              tie_word_embeddings=False)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():  # norms and the router's choice bias away from their initial values; a decisive router
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.add_(torch.rand_like(buffer) * 0.2)
                model.get_parameter(name.replace("e_score_correction_bias", "weight")).mul_(4)
    folder = tmp_path_factory.mktemp("tiny-deepseek-v3")
    model.save_pretrained(folder)
    _save_tokenizer(folder, default_gguf)
    return folder, model


def test_logits_match_transformers(tiny_deepseek):
    folder, model = tiny_deepseek
    ours = load_model(ModelSource("hf", Path(folder)))
    assert ours.config.latent_attention and ours.config.head_dim == 8
    for length in (6, 40):
        ids = random_prompt(length, length)
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0]
        assert (prefill_logits(ours, ids, block_size=4) - ref).abs().max().item() < 1e-4


def test_the_pool_holds_the_latent_and_the_rotary_key_only(tiny_deepseek):
    """A token's bytes: each layer's latent (32) and rotary key (8), one row for all 4 heads — where expanded
    heads would take 4 × (16 + 8) key and 4 × 12 value values a layer (3.6× more here, ~57× at V3's shapes)."""
    folder, _ = tiny_deepseek
    llm = LLM(str(folder), kv_cache_memory=2**20, block_size=4)
    config = llm.engine.model.config
    assert kv_bytes_per_token(config, torch.float32) == 3 * (32 + 8) * 4
    assert tuple(llm.engine.runner.kv_pool.shape[:2]) == (3, 1) and llm.engine.runner.kv_pool.shape[-2:] == (1, 40)


def test_generates_as_transformers_in_chunks_forks_and_from_a_cached_prefix(tiny_deepseek):
    """Prefill in chunks of 8 tokens over the cached latents, decode, n = 2 forks sharing their prompt's blocks,
    and a second request that resumes from the first one's cached prefix."""
    assert_chunked_forked_and_cached_generation(*tiny_deepseek)


def test_tensor_parallelism_is_refused_clearly(tiny_deepseek):
    with pytest.raises(PagedLLMError, match="tensor parallelism does not split latent attention"):
        LLM(str(tiny_deepseek[0]), kv_cache_memory=2**20, tensor_parallel_size=2)


@pytest.fixture(scope="module")
def deepseek_ggufs(tiny_deepseek, tmp_path_factory):
    """The tiny model written by `pagedllm convert` in llama.cpp's deepseek2 layout (f32 and Q8_0): kv_b_proj as
    attn_k_b / attn_v_b, one key-value head of latent + rotary key."""
    from pagedllm.tools.export import ConvertPlan, convert

    out = tmp_path_factory.mktemp("gguf-deepseek")
    for weight_type in ("f32", "q8_0"):
        convert(ModelSource("hf", Path(tiny_deepseek[0])), out / f"{weight_type}.gguf", ConvertPlan(quantize=weight_type))
    return out


def test_gguf_files_match_transformers(tiny_deepseek, deepseek_ggufs):
    from pagedllm.models.loaders.gguf_file import GGUFFile

    _, model = tiny_deepseek
    f = GGUFFile(deepseek_ggufs / "f32.gguf")
    assert f.metadata["general.architecture"] == "deepseek2" and f.metadata["deepseek2.attention.key_length"] == 40
    assert "blk.0.attn_k_b.weight" in f.tensors and "blk.0.attn_kv_b.weight" not in f.tensors
    ids = random_prompt(40, 7)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    f32 = load_model(ModelSource("gguf", deepseek_ggufs / "f32.gguf"))
    assert f32.config.latent_attention and f32.config.rope_interleaved
    assert (prefill_logits(f32, ids, block_size=4) - ref).abs().max().item() < 1e-4
    q8 = load_model(ModelSource("gguf", deepseek_ggufs / "q8_0.gguf"))
    assert_packed_logits_close(prefill_logits(q8, ids, block_size=4), ref)
    llm = LLM(str(deepseek_ggufs / "f32.gguf"), kv_cache_memory=2**20, block_size=4)
    out = llm.generate({"prompt_token_ids": ids[:11]}, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert out[0].outputs[0].token_ids == greedy_reference(model, ids[:11], 10)


def test_probes_show_latent_attention_weights(tiny_deepseek):
    """`inspect`'s attention probe on latent-attention layers: the weights transformers computes with its
    expanded heads."""
    from pagedllm.tools.inspect import inspect_model

    folder, model = tiny_deepseek
    ids = random_prompt(9, 3)
    probed = inspect_model(load_model(ModelSource("hf", Path(folder))), ids, attention=["0", "2"])
    with torch.no_grad():
        expected = model(torch.tensor([ids]), output_attentions=True).attentions
    for probe in probed.attention:
        assert torch.allclose(torch.tensor(probe.weights), expected[probe.layer][0], atol=1e-5)


def test_memory_report_shows_the_latent_row(tiny_deepseek):
    from pagedllm.tools.memory import format_report, memory_report

    report = format_report(memory_report(ModelSource("hf", Path(tiny_deepseek[0]))), 2**30)
    assert "float32 480 B" in report and "(latent 32 + rotary key 8)" in report


def test_deepseek_v2_lite_shape_matches_transformers(tmp_path, default_gguf):
    """V2-Lite's form: queries through one projection (no low-rank path), softmax routing limited to the best 2
    of 4 groups (each scored by its best expert), weights neither renormalised nor scaled (V2-Lite's 1.0: the V3
    test scales); no choice bias."""
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    from conftest import TINY, _save_tokenizer
    from pagedllm.tools.export import ConvertPlan, convert

    config = DeepseekV2Config(**{**TINY, "num_hidden_layers": 3, "num_key_value_heads": 4}, q_lora_rank=None,
                              kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                              n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, n_shared_experts=2,
                              topk_method="group_limited_greedy", n_group=4, topk_group=2, first_k_dense_replace=1,
                              routed_scaling_factor=1.0, tie_word_embeddings=False)
    torch.manual_seed(99)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
            if name.endswith("mlp.gate.weight"):
                param.mul_(4)  # a decisive router (a random one ties)
    model.save_pretrained(tmp_path)
    _save_tokenizer(tmp_path, default_gguf)
    convert(ModelSource("hf", tmp_path), tmp_path / "v2.gguf", ConvertPlan())  # softmax gating, 4 groups in the file
    ids = random_prompt(30, 8)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    for source in (ModelSource("hf", tmp_path), ModelSource("gguf", tmp_path / "v2.gguf")):
        ours = load_model(source)
        assert not hasattr(ours.layers[0].self_attn, "q_a_proj") and ours.layers[1].mlp.scoring == "softmax"
        assert (prefill_logits(ours, ids, block_size=4) - ref).abs().max().item() < 1e-4, source.kind


def test_conversion_to_llama_names_latent_attention(tiny_deepseek, tmp_path):
    from pagedllm.tools.export import ConversionError, ConvertPlan, convert

    with pytest.raises(ConversionError, match=r"multi-head latent attention \(MLA\)"):
        convert(ModelSource("hf", Path(tiny_deepseek[0])), tmp_path / "out", ConvertPlan(to="llama"))


_GOOD = {"deepseek2.attention.kv_lora_rank": 32, "deepseek2.rope.dimension_count": 8,
         "deepseek2.attention.key_length_mla": 24, "deepseek2.attention.value_length_mla": 12}


@pytest.mark.parametrize("changes,message", [
    ({"deepseek2.attention.kv_lora_rank": -1}, "kv_lora_rank' should be a count"),
    ({"deepseek2.attention.kv_lora_rank": 1.5}, "kv_lora_rank' should be a count"),
    ({"deepseek2.attention.key_length_mla": 8}, "must exceed the rotary part"),
    ({"deepseek2.attention.value_length_mla": "12"}, "value_length_mla' should be a count"),
    ({"deepseek2.rope.scaling.factor": 4.0, "deepseek2.rope.scaling.yarn_log_mul": float("nan")}, "yarn_log_mul"),
])
def test_hostile_latent_attention_metadata_is_a_clear_error(changes, message):
    """A deepseek2 file's latent-attention keys checked before anything is sized by them."""
    from pagedllm.models.loaders.gguf_file import GGUFError
    from pagedllm.models.loaders.gguf_latent import latent_fields

    class Metadata:
        path, tensors = "bad.gguf", {}

        def __init__(self, metadata):
            self.metadata = metadata

        def get(self, key, default=None):
            return self.metadata.get(key, default)

    assert latent_fields(Metadata(_GOOD), "deepseek2")["qk_nope_head_dim"] == 16
    with pytest.raises(GGUFError, match=message):
        latent_fields(Metadata({**_GOOD, **changes}), "deepseek2")


def test_mismatched_up_projection_halves_are_a_clear_error(tiny_deepseek):
    from pagedllm.models.loaders.gguf_file import GGUFError
    from pagedllm.models.loaders.gguf_latent import merged_up_projections
    from pagedllm.models.loaders import read_model_config

    config, _ = read_model_config(ModelSource("hf", Path(tiny_deepseek[0])))
    halves = [("model.layers.0.self_attn.k_b_proj.weight", torch.zeros(4, 32, 16)),
              ("model.layers.0.self_attn.v_b_proj.weight", torch.zeros(4, 13, 32))]
    with pytest.raises(GGUFError, match="up-projections have shapes"):
        list(merged_up_projections(halves, config))
    with pytest.raises(GGUFError, match="lack attn_k_b or attn_v_b"):
        list(merged_up_projections(halves[:1], config))
