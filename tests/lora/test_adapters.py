"""LoRA adapters against PEFT: the same logits (1e-4) alone, mixed in one batch step with other adapters
and the base model, and on a GGUF base whose q/k rows llama.cpp permuted."""

from __future__ import annotations


import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.lora import LoRAError

from helpers import step_logits

DENSE = ["llama", "qwen2", "mistral", "qwen3", "phi3", "glm", "glm4", "bloom", "gemma2"]


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 49152, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def make_peft_adapter(tiny, folder, seed: int, rank: int = 4, alpha: int = 8, targets="all-linear", **options):
    """A PEFT adapter on the tiny model with random A and B (PEFT starts B at 0: no update at all)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tiny.hf_dir, dtype=torch.float32, attn_implementation="eager")
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                            init_lora_weights=False, **options))
    with torch.no_grad():  # updates big enough to move the logits well past the tolerance
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(3.0)
    model.eval().save_pretrained(folder)
    return model


def peft_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _llm(source, **options) -> LLM:
    return LLM(str(source), kv_cache_memory=4 * 2**20, block_size=4, enable_lora=True, **options)


@pytest.mark.parametrize("family", DENSE)
def test_peft_adapter_gives_peft_logits(tiny_models, tmp_path, family):
    tiny = tiny_models[family]
    peft_model = make_peft_adapter(tiny, tmp_path / "a", seed=1)
    llm = _llm(tiny.hf_dir, lora_modules={"a": str(tmp_path / "a")})
    ids = _prompt(20, seed=2)
    (ours,) = step_logits(llm, [(ids, "a")])
    ref = peft_logits(peft_model, ids)
    base = peft_logits(tiny.hf_model, ids)
    assert (ref - base).abs().max() > 0.05  # the adapter does change the model
    assert (ours - ref).abs().max().item() < 1e-4


def test_adapters_and_base_mixed_in_one_step(tiny_models, tmp_path):
    tiny = tiny_models["llama"]
    a = make_peft_adapter(tiny, tmp_path / "a", seed=1)
    b = make_peft_adapter(tiny, tmp_path / "b", seed=2, rank=8, alpha=4, targets=["q_proj", "v_proj", "down_proj"],
                          use_rslora=True)
    llm = _llm(tiny.gguf_path, lora_modules={"a": str(tmp_path / "a"), "b": str(tmp_path / "b")})
    prompts = [(_prompt(9, 3), "b"), (_prompt(14, 4), None), (_prompt(7, 5), "a"), (_prompt(11, 6), "b")]
    got = step_logits(llm, prompts)
    for (ids, lora), ours in zip(prompts, got):
        ref = peft_logits({"a": a, "b": b, None: tiny.hf_model}[lora], ids)
        assert (ours - ref).abs().max().item() < 1e-4, lora


def test_generate_mixes_adapters_and_keys_the_prefix_cache_by_adapter(tiny_models, tmp_path):
    tiny = tiny_models["qwen2"]
    make_peft_adapter(tiny, tmp_path / "a", seed=1)
    make_peft_adapter(tiny, tmp_path / "b", seed=2)
    llm = _llm(tiny.hf_dir, lora_modules={"a": str(tmp_path / "a"), "b": str(tmp_path / "b")})
    prompt = {"prompt_token_ids": _prompt(16, 7)}
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = {lora: llm.generate(prompt, greedy, lora=lora)[0].token_ids for lora in (None, "a", "b")}
    assert len({tuple(t) for t in alone.values()}) == 3  # each adapter answers its own way
    # The same prompt under three adapters in one batch: each must get its own K/V, not a cached neighbour's.
    mixed = llm.generate([prompt] * 3, greedy, lora=[None, "a", "b"])
    assert [o.token_ids for o in mixed] == [alone[None], alone["a"], alone["b"]]


def test_load_and_unload_at_run_time(tiny_models, tmp_path):
    tiny = tiny_models["llama"]
    make_peft_adapter(tiny, tmp_path / "a", seed=1)
    llm = _llm(tiny.hf_dir, max_loras=1)
    prompt = {"prompt_token_ids": _prompt(10, 8)}
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    base = llm.generate(prompt, greedy)[0].token_ids
    llm.load_lora("a", str(tmp_path / "a"))
    adapted = llm.generate(prompt, greedy, lora="a")[0].token_ids
    assert adapted != base
    with pytest.raises(LoRAError, match="max-loras"):
        llm.load_lora("again", str(tmp_path / "a"))
    llm.unload_lora("a")
    with pytest.raises(ValueError, match="no LoRA adapter named 'a'"):
        llm.generate(prompt, greedy, lora="a")
    llm.load_lora("a", str(tmp_path / "a"))  # a new id: nothing cached under the old one is reused
    assert llm.generate(prompt, greedy, lora="a")[0].token_ids == adapted
    assert llm.generate(prompt, greedy)[0].token_ids == base


def test_bad_adapters_are_refused_with_the_reason(tiny_models, tmp_path):
    tiny = tiny_models["llama"]
    llm = _llm(tiny.hf_dir, max_lora_rank=4)
    make_peft_adapter(tiny, tmp_path / "big", seed=1, rank=8)
    cases = {"big": "rank 8, more than --max-lora-rank 4"}
    make_peft_adapter(tiny, tmp_path / "dora", seed=1, use_dora=True)
    cases["dora"] = "DoRA"
    make_peft_adapter(tiny, tmp_path / "head", seed=1, targets=["q_proj"], modules_to_save=["lm_head"])
    cases["head"] = "fully trained modules"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "adapter_config.json").write_text("{not json")
    cases["junk"] = "cannot read JSON"
    make_peft_adapter(tiny_models["qwen2"], tmp_path / "other", seed=1)  # another model's shapes (1 kv head)
    cases["other"] = "an adapter of another model"
    cases["missing"] = "no such folder or file"
    for name, reason in cases.items():
        with pytest.raises(LoRAError, match=reason):
            llm.load_lora(name, str(tmp_path / name))
    assert llm.engine.loras.adapters == {}


def test_moe_experts_are_not_adapted(tiny_models, tmp_path):
    tiny = tiny_models["mixtral"]
    make_peft_adapter(tiny, tmp_path / "experts", seed=1, targets=["q_proj", "gate"])  # the router
    llm = _llm(tiny.hf_dir)
    with pytest.raises(LoRAError, match="not a layer pagedllm can adapt"):
        llm.load_lora("experts", str(tmp_path / "experts"))
    attention_only = make_peft_adapter(tiny, tmp_path / "attn", seed=2, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    llm.load_lora("attn", str(tmp_path / "attn"))
    ids = _prompt(12, 9)
    (ours,) = step_logits(llm, [(ids, "attn")])
    assert (ours - peft_logits(attention_only, ids)).abs().max().item() < 1e-4


def write_gguf_lora(peft_folder, path, tiny, alpha: float, arch: str = "llama"):
    """The PEFT adapter as llama.cpp's convert_lora_to_gguf.py writes it: `<base tensor>.lora_a` [r, in] and
    `.lora_b` [out, r] under llama.cpp's names, q/k rows of B permuted like the base weights."""
    from gguf import GGUFWriter
    from safetensors.torch import load_file

    from pagedllm.models.loaders import read_model_config, ModelSource
    from pagedllm.tools.convert import gguf_name, permute_rows

    config, family = read_model_config(ModelSource("hf", tiny.hf_dir))
    writer = GGUFWriter(str(path), arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for key, tensor in sorted(load_file(peft_folder / "adapter_model.safetensors").items()):
        module, which = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        name = gguf_name(f"{module}.weight", family)
        if which.startswith("B") and (".q_proj" in module or ".k_proj" in module):
            heads = config.num_attention_heads if ".q_proj" in module else config.num_key_value_heads
            tensor = permute_rows(tensor, heads)
        writer.add_tensor(f"{name}.lora_{which[0].lower()}", tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_llama_cpp_gguf_lora_gives_peft_logits(tiny_models, tmp_path):
    tiny = tiny_models["llama"]
    peft_model = make_peft_adapter(tiny, tmp_path / "a", seed=3, alpha=12)
    write_gguf_lora(tmp_path / "a", tmp_path / "a.gguf", tiny, alpha=12)
    llm = _llm(tiny.gguf_path, lora_modules={"gguf": str(tmp_path / "a.gguf")})
    ids = _prompt(18, 10)
    (ours,) = step_logits(llm, [(ids, "gguf")])
    assert (ours - peft_logits(peft_model, ids)).abs().max().item() < 1e-4
    write_gguf_lora(tmp_path / "a", tmp_path / "qwen.gguf", tiny, alpha=12, arch="qwen2")
    with pytest.raises(LoRAError, match="for 'qwen2' models"):
        llm.load_lora("wrong", str(tmp_path / "qwen.gguf"))


def test_an_adapter_in_use_is_not_unloaded(tiny_models, tmp_path):
    tiny = tiny_models["llama"]
    make_peft_adapter(tiny, tmp_path / "a", seed=1)
    llm = _llm(tiny.hf_dir, lora_modules={"a": str(tmp_path / "a")})
    llm.engine.add_request("r", {"prompt_token_ids": _prompt(8, 11)}, SamplingParams(max_tokens=4), lora="a")
    llm.engine.step()
    with pytest.raises(LoRAError, match="in use by 1"):
        llm.unload_lora("a")
    while llm.engine.has_unfinished():
        llm.engine.step()
    llm.unload_lora("a")
    assert llm.engine.loras.adapters == {}
