"""`pagedllm convert`: family conversions checked in transformers, bit-exact round trips and
tensor/pipeline split-merge, GGUF export in packed formats, and refusals that say why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pagedllm import LLM, SamplingParams
from pagedllm.entrypoints.cli import main
from pagedllm.models.loaders import ModelSource, load_model
from pagedllm.tokenizer import load_tokenizer
from pagedllm.tools.export import ConversionError, ConvertPlan, convert

from helpers import prefill_logits

IDS = torch.randint(3, 49152, (24,), generator=torch.Generator().manual_seed(3)).tolist()  # past mistral's window


def _hf_logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0]


def _reference_logits(tiny) -> torch.Tensor:
    with torch.no_grad():
        return tiny.hf_model(torch.tensor([IDS])).logits[0]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    (path,) = folder.glob("*.safetensors")
    return load_file(path)


def test_qwen2_as_llama_loads_in_transformers_with_the_same_logits(tiny_models, tmp_path):
    tiny = tiny_models["qwen2"]
    print(convert(ModelSource("hf", tiny.hf_dir), tmp_path / "llama", ConvertPlan(to="llama")))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tmp_path / "llama")
    assert config.architectures == ["LlamaForCausalLM"] and config.attention_bias
    assert torch.allclose(_hf_logits(tmp_path / "llama"), _reference_logits(tiny), atol=1e-5)


def test_mistral_keeps_its_window_as_qwen2_and_in_a_llama_gguf(tiny_models, tmp_path):
    tiny = tiny_models["mistral"]  # window 8, shorter than the 24 tokens
    with pytest.raises(ConversionError, match="a sliding window of 8 tokens"):
        convert(ModelSource("hf", tiny.hf_dir), tmp_path / "llama", ConvertPlan(to="llama"))
    convert(ModelSource("hf", tiny.hf_dir), tmp_path / "qwen2", ConvertPlan(to="qwen2"))
    assert torch.allclose(_hf_logits(tmp_path / "qwen2"), _reference_logits(tiny), atol=1e-5)
    gguf = tmp_path / "mistral-as-llama.gguf"
    convert(ModelSource("hf", tiny.hf_dir), gguf, ConvertPlan(to="llama"))
    model = load_model(ModelSource("gguf", gguf))
    assert model.config.family == "llama" and model.config.sliding_window == 8
    assert torch.allclose(prefill_logits(model, IDS), _reference_logits(tiny), atol=1e-4)


def test_llama_qwen2_llama_round_trip_is_bit_exact(tiny_models, tmp_path):
    tiny = tiny_models["llama"]
    convert(ModelSource("hf", tiny.hf_dir), tmp_path / "qwen2", ConvertPlan(to="qwen2"))
    as_qwen2 = _tensors(tmp_path / "qwen2")
    assert not as_qwen2["model.layers.0.self_attn.q_proj.bias"].any()  # zero biases: Qwen2 always has them
    assert torch.allclose(_hf_logits(tmp_path / "qwen2"), _reference_logits(tiny), atol=1e-5)
    convert(ModelSource("hf", tmp_path / "qwen2"), tmp_path / "back", ConvertPlan(to="llama"))
    original, back = _tensors(tiny.hf_dir), _tensors(tmp_path / "back")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[name], back[name]) for name in original)
    assert torch.equal(_hf_logits(tmp_path / "back"), _hf_logits(tiny.hf_dir))


@pytest.mark.parametrize("family, reasons", [
    ("gemma2", ["norms around each sub-layer", "scaled embeddings", "soft-capped logits", "(1 + w) norms"]),
    ("granite", ["scaled embeddings", "residual and logit multipliers (Granite)", "a query scale other than"]),
    ("smollm3", ["layers without rotary positions (NoPE)"]),
    ("glm4_moe", ["routed experts", "per-head q/k norms"]),
    ("bloom", ["ALiBi position biases (LlamaForCausalLM has rotary positions only)", "LayerNorm", "MLP biases"]),
    ("mixtral", ["routed experts"]),
    ("glm", ["rotary on part of each head", "interleaved rotary pairs"]),
    ("qwen3", ["per-head q/k norms"]),
])
def test_refusals_name_every_reason(tiny_models, tmp_path, family, reasons):
    with pytest.raises(ConversionError) as refused:
        convert(ModelSource("hf", tiny_models[family].hf_dir), tmp_path / "out", ConvertPlan(to="llama"))
    assert all(reason in str(refused.value) for reason in reasons), str(refused.value)


def test_qwen2_with_real_biases_cannot_become_mistral(tiny_models, tmp_path):
    with pytest.raises(ConversionError, match=r"q/k/v biases \(MistralForCausalLM has none\)"):
        convert(ModelSource("hf", tiny_models["qwen2"].hf_dir), tmp_path / "m", ConvertPlan(to="mistral"))


def _greedy(model: str, tokens: int = 8) -> list[int]:
    llm = LLM(model, kv_cache_memory=8 * 2**20)
    return llm.generate({"prompt_token_ids": IDS[:10]}, SamplingParams(max_tokens=tokens, temperature=0))[0].token_ids


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # 2 and 1 key/value heads: tp 4 repeats them
@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2)])
def test_split_and_merge_are_bit_exact_and_every_set_generates_alike(tiny_models, tmp_path, family, tp, pp):
    tiny = tiny_models[family]
    shards, merged = tmp_path / "shards", tmp_path / "merged"
    convert(ModelSource("hf", tiny.hf_dir), shards, ConvertPlan(tp=tp, pp=pp))
    files = sorted(p.name for p in shards.glob("*.safetensors"))
    if tp * pp > 1:
        assert files == sorted(f"model-tp{r}-pp{s}.safetensors" for r in range(tp) for s in range(pp))
        kv = load_file(shards / "model-tp0-pp0.safetensors")["model.layers.0.self_attn.k_proj.weight"]
        heads = tiny.hf_model.config.num_key_value_heads
        assert kv.shape[0] == 16 * max(1, heads // tp)  # whole heads; one (repeated) where tp exceeds them
    convert(ModelSource("hf", shards), merged, ConvertPlan(merge=tp * pp > 1))
    original, back = _tensors(tiny.hf_dir), _tensors(merged)
    assert original.keys() == back.keys() and all(torch.equal(original[n], back[n]) for n in original)
    assert _greedy(str(shards)) == _greedy(str(tiny.hf_dir))


def test_tensor_rank_shards_are_what_each_rank_holds(tiny_models, tmp_path):
    """tp 4 over 2 key/value heads: ranks 0 and 1 share head 0, 2 and 3 head 1 (distributed.attention_heads)."""
    convert(ModelSource("hf", tiny_models["llama"].hf_dir), tmp_path / "s", ConvertPlan(tp=4))
    k = [load_file(tmp_path / "s" / f"model-tp{r}-pp0.safetensors")["model.layers.1.self_attn.k_proj.weight"]
         for r in range(4)]
    full = _tensors(tiny_models["llama"].hf_dir)["model.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(k[0], k[1]) and torch.equal(k[2], k[3]) and torch.equal(torch.cat([k[0], k[2]]), full)
    q = load_file(tmp_path / "s" / "model-tp3-pp0.safetensors")["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(q, _tensors(tiny_models["llama"].hf_dir)["model.layers.1.self_attn.q_proj.weight"][48:])


def test_a_tampered_shard_set_is_refused(tiny_models, tmp_path):
    from safetensors.torch import save_file

    shards = tmp_path / "s"
    convert(ModelSource("hf", tiny_models["llama"].hf_dir), shards, ConvertPlan(tp=4))
    part = load_file(shards / "model-tp1-pp0.safetensors")
    part["model.layers.0.self_attn.k_proj.weight"] += 1  # rank 1's copy of a shared head no longer agrees
    save_file(part, shards / "model-tp1-pp0.safetensors")
    assert main(["convert", str(shards), "--merge", "--out", str(tmp_path / "m")]) == 2


# (type asked, the ffn_up blocks' type — K-quants need 256-wide rows: these 64-wide ones fall back as in
# llama.cpp —, mean |Δlogit| bound on this random model)
@pytest.mark.parametrize("quantize, stored, atol", [("f16", "F16", 1e-3), ("q8_0", "Q8_0", 0.03), ("q4_1", "Q4_1", 0.3),
                                                    ("q5_k", "Q5_1", 0.15), ("q4_k_m", "Q5_0", 0.1)])
def test_gguf_export_in_packed_formats_loads_in_pagedllm(tiny_models, tmp_path, quantize, stored, atol):
    from pagedllm.models.loaders.gguf_file import open_gguf

    tiny = tiny_models["qwen2"]
    gguf = tmp_path / f"qwen2-{quantize}.gguf"
    assert main(["convert", str(tiny.hf_dir), "--out", str(gguf), "--quantize", quantize]) == 0
    model = load_model(ModelSource("gguf", gguf))
    assert model.config.family == "qwen2"
    assert open_gguf(gguf).tensors["blk.0.ffn_up.weight"].ggml_type.name == stored
    error = (prefill_logits(model, IDS) - _reference_logits(tiny)).abs()
    assert error.mean() < atol
    hf_tok, gguf_tok = load_tokenizer(ModelSource("hf", tiny.hf_dir)), load_tokenizer(ModelSource("gguf", gguf))
    text = "Hello, world! 12345 <|im_start|>user\nçà va?"
    assert gguf_tok.encode(text) == hf_tok.encode(text)
    assert gguf_tok.chat_template == hf_tok.chat_template


def test_gguf_source_to_hugging_face_llama(tiny_models, tmp_path):
    tiny = tiny_models["qwen2"]
    assert main(["convert", str(tiny.gguf_path), "--to", "llama", "--out", str(tmp_path / "hf")]) == 0
    assert torch.allclose(_hf_logits(tmp_path / "hf"), _reference_logits(tiny), atol=1e-5)
    assert load_tokenizer(ModelSource("hf", tmp_path / "hf")).encode("Hi there") == \
        load_tokenizer(ModelSource("gguf", tiny.gguf_path)).encode("Hi there")


@pytest.mark.parametrize("argv, message", [
    (["--to", "gemma2"], "pagedllm writes Hugging Face checkpoints of llama, mistral, qwen2, qwen3"),
    (["--quantize", "q4_0"], "--quantize applies to GGUF output"),
    (["--merge"], "--merge needs a shard set"),
    (["--tp", "3"], "cannot be split over 3 ranks"),
    (["--pp", "3"], "2 layers cannot be split over 3 pipeline stages"),
])
def test_cli_errors_are_one_line(tiny_models, tmp_path, capsys, argv, message):
    assert main(["convert", str(tiny_models["llama"].hf_dir), "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_shard_set_runs_under_tensor_parallelism(tiny_models, tmp_path):
    """Two ranks, each taking its slice of the merged set (its own shard's pieces), generate as one process."""
    shards = tmp_path / "shards"
    convert(ModelSource("hf", tiny_models["llama"].hf_dir), shards, ConvertPlan(tp=2))
    llm = LLM(str(shards), kv_cache_memory=4 * 2**20, tensor_parallel_size=2)
    try:
        params = SamplingParams(max_tokens=8, temperature=0)
        tokens = llm.generate({"prompt_token_ids": IDS[:10]}, params)[0].token_ids
    finally:
        llm.engine.runner.shutdown()
    assert tokens == _greedy(str(tiny_models["llama"].hf_dir))


def test_mistral_without_a_window_becomes_plain_llama(tmp_path, default_gguf):
    from transformers import AutoModelForCausalLM, MistralConfig

    from conftest import _save_tokenizer

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    mistral = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    mistral.save_pretrained(tmp_path / "mistral")
    _save_tokenizer(tmp_path / "mistral", default_gguf)
    ids = [5, 17, 99, 3, 250, 7, 64, 640, 11, 12]
    convert(ModelSource("hf", tmp_path / "mistral"), tmp_path / "llama", ConvertPlan(to="llama"))
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", attn_implementation="eager").eval()
    assert type(llama).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert torch.allclose(llama(torch.tensor([ids])).logits, mistral(torch.tensor([ids])).logits, atol=1e-5)
