"""Baichuan 1/2 (7B: RoPE; 13B: ALiBi) against a plain-torch reference of its published modeling
file (baichuan-inc/Baichuan2-7B-Chat and -13B-Chat, modeling_baichuan.py: W_pack, RMSNorm, SwiGLU,
rotate-half RoPE or ALiBi, NormHead). transformers has no Baichuan class (the models ship remote code)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pagedllm import LLM, SamplingParams
from pagedllm.kernels import quant_kernels_available
from pagedllm.layers.linear import Linear, PackedMethod
from pagedllm.models.loaders import ModelSource, load_model, read_model_config
from pagedllm.models.loaders.hf_loader import hf_weights
from pagedllm.tools.convert import write_gguf
from helpers import assert_packed_logits_close, prefill_logits

HIDDEN, HEADS, INTER, VOCAB = 64, 4, 128, 49152


def _random_checkpoint(layers: int, seed: int) -> dict[str, torch.Tensor]:
    """Random weights; deeper models get smaller ones, so the residual stream (and rounding) stays alike."""
    g = torch.Generator().manual_seed(seed)
    layer_scale = 0.1 * (2 / layers) ** 0.5

    def rand(*shape, scale=layer_scale):
        return torch.randn(*shape, generator=g) * scale

    weights = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN, scale=0.1), "model.norm.weight": 1 + rand(HIDDEN),
               "lm_head.weight": rand(VOCAB, HIDDEN, scale=0.1)}
    for i in range(layers):
        p = f"model.layers.{i}."
        weights |= {p + "self_attn.W_pack.weight": rand(3 * HIDDEN, HIDDEN), p + "self_attn.o_proj.weight": rand(HIDDEN, HIDDEN),
                    p + "mlp.gate_proj.weight": rand(INTER, HIDDEN), p + "mlp.up_proj.weight": rand(INTER, HIDDEN),
                    p + "mlp.down_proj.weight": rand(HIDDEN, INTER), p + "input_layernorm.weight": 1 + rand(HIDDEN),
                    p + "post_attention_layernorm.weight": 1 + rand(HIDDEN)}
    return weights


def _rms_norm(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _alibi_mask(length: int) -> torch.Tensor:
    """modeling_baichuan.py (13B): _get_interleave slopes × key position, future keys -inf."""
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    closest = 2 ** math.floor(math.log2(HEADS))
    slopes = power_of_2(closest) + power_of_2(2 * closest)[0::2][: HEADS - closest]
    bias = torch.tensor(slopes)[:, None, None] * torch.arange(length)[None, None, :]
    future = torch.triu(torch.full((length, length), float("-inf")), 1)
    return bias + future[None]


def reference_logits(w: dict[str, torch.Tensor], ids: list[int], layers: int, alibi: bool) -> torch.Tensor:
    """The published forward, one sequence, fp32."""
    n, head_dim = len(ids), HIDDEN // HEADS
    x = w["model.embed_tokens.weight"][ids]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    emb = torch.cat([torch.outer(torch.arange(n).float(), inv_freq)] * 2, dim=-1)
    cos, sin = emb.cos(), emb.sin()
    for i in range(layers):
        p = f"model.layers.{i}."
        h = _rms_norm(x, w[p + "input_layernorm.weight"])
        q, k, v = (h @ w[p + "self_attn.W_pack.weight"].T).view(n, 3, HEADS, head_dim).unbind(1)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        if alibi:
            scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + _alibi_mask(n)
            attn = scores.softmax(-1) @ v
        else:
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            attn = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
        x = x + attn.transpose(0, 1).reshape(n, HIDDEN) @ w[p + "self_attn.o_proj.weight"].T
        h = _rms_norm(x, w[p + "post_attention_layernorm.weight"])
        x = x + (F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    return _rms_norm(x, w["model.norm.weight"]) @ F.normalize(w["lm_head.weight"]).T  # NormHead


# 7B-shaped: RoPE; 13B-shaped: 40 layers (how llama.cpp and pagedllm tell the ALiBi models apart).
VARIANTS = {"baichuan2-7b": (2, False), "baichuan2-13b": (40, True)}


@pytest.fixture(scope="module")
def baichuan_models(tmp_path_factory, default_gguf, default_tokenizer_metadata):
    """Each variant's folder, GGUF, weights, layers and ALiBi flag, built on first use."""
    from conftest import _save_tokenizer

    built = {}

    def get(variant: str):
        if variant not in built:
            layers, alibi = VARIANTS[variant]
            folder = tmp_path_factory.mktemp(variant)
            weights = _random_checkpoint(layers, seed=layers)
            save_file(weights, folder / "model.safetensors")
            (folder / "config.json").write_text(json.dumps({
                "architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "hidden_size": HIDDEN,
                "intermediate_size": INTER, "num_attention_heads": HEADS, "num_hidden_layers": layers,
                "rms_norm_eps": 1e-6, "vocab_size": VOCAB, "model_max_length": 256, "hidden_act": "silu",
                "tie_word_embeddings": False, "z_loss_weight": 0}))  # z_loss_weight: a Baichuan 2 config
            _save_tokenizer(folder, default_gguf)
            config, _ = read_model_config(ModelSource("hf", folder))
            gguf = folder.parent / f"{variant}.gguf"
            write_gguf(gguf, config, hf_weights(folder), default_tokenizer_metadata)
            built[variant] = (folder, gguf, weights, layers, alibi)
        return built[variant]

    return get


@pytest.fixture(params=list(VARIANTS))
def baichuan(request, baichuan_models):
    return baichuan_models(request.param)


def test_config(baichuan):
    folder, _, _, layers, alibi = baichuan
    config, _ = read_model_config(ModelSource("hf", folder))
    assert config.position_encoding == ("alibi" if alibi else "rope") and config.normalized_head


@pytest.mark.parametrize("loader", ["hf", "gguf"])
def test_logits_match_reference(baichuan, loader):
    folder, gguf, weights, layers, alibi = baichuan
    ids = torch.randint(3, VOCAB, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    source = ModelSource("hf", folder) if loader == "hf" else ModelSource("gguf", gguf)
    ours = prefill_logits(load_model(source), ids, block_size=4)
    assert (ours - reference_logits(weights, ids, layers, alibi)).abs().max().item() < 1e-4


@pytest.mark.parametrize("loader", ["hf", "gguf"])
def test_32_greedy_tokens_match_reference(baichuan, loader):
    folder, gguf, weights, layers, alibi = baichuan
    ids = torch.randint(3, VOCAB, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    llm = LLM(str(folder if loader == "hf" else gguf), kv_cache_memory=8 * 2**20, block_size=4)
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
    expected = list(ids)
    for _ in range(32):
        expected.append(int(reference_logits(weights, expected, layers, alibi)[-1].argmax()))
    assert out.token_ids == expected[len(ids):]


@pytest.mark.skipif(not quant_kernels_available(), reason="needs a C++ compiler for the CPU kernels")
def test_quantised_gguf_runs_packed(baichuan, tmp_path, default_tokenizer_metadata):
    folder, *_ = baichuan
    config, _ = read_model_config(ModelSource("hf", folder))
    path = tmp_path / "q8_0.gguf"
    write_gguf(path, config, hf_weights(folder), default_tokenizer_metadata, weight_type="q8_0")
    packed, dense = load_model(ModelSource("gguf", path)), load_model(ModelSource("gguf", path), quantization="none")
    assert all(isinstance(m.method, PackedMethod) for m in packed.modules() if isinstance(m, Linear))
    ids = list(range(100, 124))
    for length in (1, 24):
        assert_packed_logits_close(prefill_logits(packed, ids[:length]), prefill_logits(dense, ids[:length]))


def test_alibi_changes_the_result(baichuan_models):
    """The 13B-shaped model's logits depend on its ALiBi slopes (the reference match is not by chance)."""
    folder, *_ = baichuan_models("baichuan2-13b")
    model = load_model(ModelSource("hf", folder))
    ids = list(range(200, 224))
    with_alibi = prefill_logits(model, ids)
    for layer in model.layers:
        layer.self_attn.alibi = torch.zeros_like(layer.self_attn.alibi)
    assert (prefill_logits(model, ids) - with_alibi).abs().max().item() > 1e-3


def test_converts_to_llama_by_unfusing_w_pack_and_folding_the_norm_head(baichuan_models, tmp_path):
    """pagedllm convert --to llama: transformers' LlamaForCausalLM gives the published model's logits."""
    from transformers import AutoModelForCausalLM

    from pagedllm.tools.export import ConvertPlan, convert

    folder, _, weights, layers, alibi = baichuan_models("baichuan2-7b")
    convert(ModelSource("hf", folder), tmp_path / "llama", ConvertPlan(to="llama"))
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    ids = torch.randint(3, VOCAB, (24,), generator=torch.Generator().manual_seed(4)).tolist()
    with torch.no_grad():
        logits = llama(torch.tensor([ids])).logits[0]
    assert (logits - reference_logits(weights, ids, layers, alibi)).abs().max().item() < 1e-4


def test_alibi_model_is_refused_as_llama(baichuan_models, tmp_path):
    from pagedllm.tools.export import ConversionError, ConvertPlan, convert

    folder, *_ = baichuan_models("baichuan2-13b")
    with pytest.raises(ConversionError, match="ALiBi position biases"):
        convert(ModelSource("hf", folder), tmp_path / "llama", ConvertPlan(to="llama"))
