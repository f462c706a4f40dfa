"""Hybrid models (issue 36): LFM2's gated short convolutions beside attention, each sequence's
convolution state in a slot of its own — against transformers, through chunked prefill, batches,
forks (n > 1) and preemption."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pagedllm import LLM, SamplingParams, kernels
from pagedllm.config import ModelConfig
from pagedllm.engine.model_runner import plan_kv_cache
from pagedllm.errors import ConfigError, PagedLLMError
from pagedllm.layers.recurrent_state import StateMetadata, causal_conv
from pagedllm.models.loaders import ModelSource, load_model, read_model_config
from helpers import greedy_reference, prefill_logits, random_prompt

VOCAB = 49152  # the default model's tokenizer, saved beside the tiny model


def _tiny_configs():
    from transformers import Lfm2Config, Lfm2MoeConfig, Qwen3_5MoeTextConfig, Qwen3_5TextConfig, Qwen3NextConfig

    delta_net = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
                     linear_num_key_heads=2, linear_num_value_heads=4, max_position_embeddings=256,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
    experts = dict(moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2)
    return {
        # short convolutions of 3 taps in three layers of four
        "lfm2": Lfm2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           layer_types=["conv", "conv", "full_attention", "conv"], conv_L_cache=3),
        # + 4 routed experts of 32 after the first (dense) layer, 2 a token by sigmoid scores and a choice bias,
        # renormalised
        "lfm2_moe": Lfm2MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, layer_types=["conv", "conv", "full_attention", "conv"],
                                  conv_L_cache=3, num_experts=4, num_experts_per_tok=2, num_dense_layers=1),
        # Gated DeltaNet (2 key heads, 4 value heads of 8) in three layers of four, gated attention with a
        # quarter of each head rotating
        "qwen3_5": Qwen3_5TextConfig(**delta_net, intermediate_size=96),
        # + routed experts (4, 2 a token, renormalised) and a gated shared expert in every layer
        "qwen3_5_moe": Qwen3_5MoeTextConfig(**delta_net, **experts),
        # its Gated DeltaNet projections grouped by key head in the checkpoint; experts not renormalised
        "qwen3_next": Qwen3NextConfig(**delta_net, **experts, intermediate_size=96, norm_topk_prob=False),
    }


@pytest.fixture(scope="module")
def tiny_hybrids(tmp_path_factory, default_gguf):
    from transformers import AutoModelForCausalLM

    from conftest import _save_tokenizer

    models = {}
    for family, config in _tiny_configs().items():
        torch.manual_seed(1234)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        with torch.no_grad():  # norms away from their initial values, so a misplaced one shows
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.add_(torch.randn_like(param) * 0.1)
            for name, buffer in model.named_buffers():  # LFM2-MoE's choice bias starts at zero; a decisive router
                if name.endswith("expert_bias"):
                    buffer.add_(torch.rand_like(buffer) * 0.2)
                    model.get_parameter(name.replace("expert_bias", "gate.weight")).mul_(4)
        folder = tmp_path_factory.mktemp(f"tiny-{family}")
        model.save_pretrained(folder)
        _save_tokenizer(folder, default_gguf)
        models[family] = (folder, model)
    return models


@pytest.fixture
def tiny_lfm2(tiny_hybrids):
    return tiny_hybrids["lfm2"]


def test_lfm2_widens_its_mlp_by_its_own_rule(tiny_lfm2):
    config, _ = read_model_config(ModelSource("hf", Path(tiny_lfm2[0])))
    assert config.intermediate_size == 256  # 2/3 of 192, rounded up to a multiple of 256
DELTA_NET = ("gated_delta_net",) * 3 + ("attention",)
FAMILIES = ["lfm2", "qwen3_5", "qwen3_5_moe", "qwen3_next"]


@pytest.mark.parametrize("family,mixers", [("lfm2", ("short_conv", "short_conv", "attention", "short_conv")),
                                           ("lfm2_moe", ("short_conv", "short_conv", "attention", "short_conv")),
                                           ("qwen3_5", DELTA_NET), ("qwen3_5_moe", DELTA_NET),
                                           ("qwen3_next", DELTA_NET)])
def test_logits_match_transformers(tiny_hybrids, family, mixers):
    """Prompts within one chunk of the chunked delta rule and over several (150 tokens: 3 chunks of 64)."""
    folder, model = tiny_hybrids[family]
    ours = load_model(ModelSource("hf", Path(folder)))
    assert ours.config.layer_mixers == mixers
    for length in (24, 150):
        ids = random_prompt(length, 0)
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0]
        assert (prefill_logits(ours, ids, block_size=4) - ref).abs().max().item() < 1e-4


def test_delta_net_decodes_through_its_torch_form_too(tiny_hybrids, recurrent_path):
    folder, model = tiny_hybrids["qwen3_5"]
    ids = random_prompt(9, 2)
    llm = LLM(str(folder), kv_cache_memory=2**20, block_size=4)
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert out[0].outputs[0].token_ids == greedy_reference(model, ids, 10)


@pytest.mark.parametrize("family", FAMILIES)
def test_generates_as_transformers_in_chunks_batches_and_forks(tiny_hybrids, family):
    """Three prompts at once, prefilled 8 tokens a step (each chunk continues its states), then decoded
    together; and n = 3 greedy samples of one prompt (forks copy their parent's states)."""
    folder, model = tiny_hybrids[family]
    prompts = [random_prompt(n, n) for n in (5, 13, 30)]
    refs = [greedy_reference(model, ids, 16) for ids in prompts]
    llm = LLM(str(folder), kv_cache_memory=2**20, block_size=4, max_num_batched_tokens=8)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
    assert [o.outputs[0].token_ids for o in outs] == refs
    forked = llm.generate({"prompt_token_ids": prompts[1]}, SamplingParams(max_tokens=16, temperature=0,
                                                                          ignore_eos=True, n=3))[0]
    assert [o.token_ids for o in forked.outputs] == [refs[1]] * 3


def test_lfm2_preempted_sequences_start_their_state_over(tiny_lfm2):
    """A KV budget too small for four long sequences at once: some are preempted and recomputed, and
    their state slots go back to the pool and start from zeros again."""
    folder, model = tiny_lfm2
    prompts = [random_prompt(20, 40 + i) for i in range(4)]
    refs = [greedy_reference(model, ids, 24) for ids in prompts]
    config, _ = read_model_config(ModelSource("hf", Path(folder)))
    memory = 24 * plan_kv_cache(config, 4, 2**20, torch.float32).bytes_per_block + 4 * config.state_bytes_per_sequence
    llm = LLM(str(folder), kv_cache_memory=memory, block_size=4, max_num_seqs=4)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert llm.engine.scheduler.num_preemptions > 0


def test_lfm2_memory_plan_holds_a_state_per_sequence(tiny_lfm2):
    folder, _ = tiny_lfm2
    llm = LLM(str(folder), kv_cache_memory=2**20, block_size=4, max_num_seqs=8)
    spec = llm.engine.kv_spec
    assert spec.num_state_slots == 8 and spec.state_bytes_per_slot == 3 * 2 * 64 * 4  # 3 conv layers, 2 inputs of 64
    # The prefix cache's saved states: what the running ones leave of half the budget, up to a quarter of it.
    assert spec.num_snapshot_slots == 2**20 // 4 // spec.state_bytes_per_slot == 170
    assert spec.num_blocks == (2**20 - (8 + 170) * spec.state_bytes_per_slot) // spec.bytes_per_block
    assert spec.bytes_per_block == 2 * 1 * 2 * 16 * 4 * 4  # K and V, one attention layer, 2 kv heads of 16, 4 tokens
    # A budget whose half holds the states of 5 sequences, not the 64 asked for: 4 run at once, 1 is saved.
    small = LLM(str(folder), kv_cache_memory=10 * spec.state_bytes_per_slot + 100, block_size=4, max_num_seqs=64)
    assert small.engine.kv_spec.num_state_slots == small.engine.scheduler.config.max_num_seqs == 4
    assert small.engine.kv_spec.num_snapshot_slots == 1
    plain = LLM(str(folder), kv_cache_memory=10 * spec.state_bytes_per_slot + 100, block_size=4, max_num_seqs=64,
                enable_prefix_caching=False)
    assert (plain.engine.kv_spec.num_state_slots, plain.engine.kv_spec.num_snapshot_slots) == (5, 0)
    with pytest.raises(PagedLLMError, match="cannot hold one sequence's recurrent states"):
        LLM(str(folder), kv_cache_memory=spec.state_bytes_per_slot, block_size=4)


@pytest.mark.parametrize("family", ["lfm2", "qwen3_5"])
def test_speculative_decoding_rolls_rejected_drafts_back(tiny_hybrids, family):
    """N-gram drafts on a hybrid: each drafting step's states are checkpointed first; where a draft is
    rejected they go back to the checkpoint and the tokens kept are computed again — the greedy tokens stay
    transformers', with drafts both accepted and rejected on the way."""
    folder, model = tiny_hybrids[family]
    llm = LLM(str(folder), kv_cache_memory=2**20, block_size=4,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    scheduler = llm.engine.scheduler
    for seed in range(4):
        prompt = random_prompt(12, 20 + seed)
        # The prompt, its answer, the prompt again: the n-gram proposer drafts the answer again (accepted
        # where the states lead the model to repeat it); or a segment repeated (drafts of another kind).
        ids = prompt + greedy_reference(model, prompt, 12) + prompt if seed % 2 else prompt[:6] * 4
        out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
        assert out[0].outputs[0].token_ids == greedy_reference(model, ids, 24)
    assert scheduler.num_draft_tokens > scheduler.num_accepted_drafts > 0


@pytest.fixture(params=["kernels", "torch"])
def recurrent_path(request, monkeypatch):
    """The recurrent layers through the C++ kernels (where they build) and through their torch forms."""
    if request.param == "torch":
        monkeypatch.setattr(kernels, "quant_kernels_available", lambda: False)
    return request.param


def test_causal_conv_continues_each_sequence_from_its_state(recurrent_path):
    """Three sequences fed in uneven chunks (one of them a single token, one absent from a step) give the
    convolution of each whole sequence."""
    channels, taps = 6, 4
    weight = torch.randn(channels, taps, generator=torch.Generator().manual_seed(0))
    full = [torch.randn(n, channels, generator=torch.Generator().manual_seed(n)) for n in (9, 1, 5)]
    state, slots, done = torch.full((5, taps - 1, channels), float("nan")), np.array([3, 0, 4]), np.zeros(3, int)
    outs = [[] for _ in full]
    for chunk in [(2, 1, 5), (1, 0, 0), (6, 0, 0)]:
        sel = [i for i in range(3) if chunk[i]]
        meta = StateMetadata.build(done[sel], np.array([chunk[i] for i in sel]), slots[sel], "cpu")
        y = causal_conv(torch.cat([full[i][done[i]:done[i] + chunk[i]] for i in sel]), weight, None, state, meta)
        for i, part in zip(sel, y.split([chunk[i] for i in sel])):
            outs[i].append(part)
            done[i] += chunk[i]
    for seq, got in zip(full, outs):
        padded = torch.cat([torch.zeros(taps - 1, channels), seq])
        want = torch.stack([(padded[t:t + taps] * weight.T).sum(0) for t in range(len(seq))])
        torch.testing.assert_close(torch.cat(got), want)


def test_layer_mixers_are_checked():
    base = dict(family="lfm2", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    with pytest.raises(ConfigError, match="2 to 64 taps"):
        ModelConfig(**base, layer_mixers=("short_conv", "attention"), conv_kernel=1)
    with pytest.raises(ConfigError, match="not one of"):
        ModelConfig(**base, layer_mixers=("mamba", "attention"))
    with pytest.raises(ConfigError, match="1 layer mixers for 2 layers"):
        ModelConfig(**base, layer_mixers=("attention",))


def test_memory_report_shows_the_state_per_sequence(tiny_lfm2):
    from pagedllm.tools.memory import format_report, memory_report

    folder, _ = tiny_lfm2
    text = format_report(memory_report(ModelSource("hf", Path(folder))), 2**30)
    assert "state/sequence   1.50 KiB float32 (3 recurrent layers" in text
    assert "(2 · 1 attention layers · 2 kv heads" in text


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_prefilled_in_chunks_of_1_7_and_64_gives_the_one_pass_logprobs(tiny_hybrids, family):
    """Every prompt position's log-probability, the prompt prefilled whole (one chunk of 100 tokens: two of
    the delta rule's chunks) and in chunks of 1, 7 and 64 tokens (each continuing from the states the
    last one left), through the engine."""
    folder, _ = tiny_hybrids[family]
    prompt = random_prompt(100, 7)
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)

    def prompt_logprobs(budget: int) -> list[float]:
        llm = LLM(str(folder), kv_cache_memory=2**20, block_size=4, max_num_batched_tokens=budget)
        out = llm.generate({"prompt_token_ids": prompt}, params)[0]
        return [next(iter(lp.values())).logprob for lp in out.prompt_logprobs[1:]]

    whole = prompt_logprobs(128)
    for budget in (1, 7, 64):
        assert prompt_logprobs(budget) == pytest.approx(whole, abs=1e-4), budget


@pytest.mark.parametrize("family", ["lfm2", "qwen3_5"])
def test_beam_search_matches_transformers(tiny_hybrids, family):
    """Beams of width 4: each beam a fork whose states are copied from its parent's slot each step."""
    folder, model = tiny_hybrids[family]
    llm = LLM(str(folder), kv_cache_memory=2**20, block_size=4)
    eos = sorted(llm.get_tokenizer().stop_token_ids)
    ids = random_prompt(12, 3)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), num_beams=4, num_return_sequences=4, do_sample=False,
                             max_new_tokens=10, min_new_tokens=10, eos_token_id=eos, pad_token_id=eos[0])
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, use_beam_search=True, n=4,
                                                                 max_tokens=10, ignore_eos=True))[0]
    assert [o.token_ids for o in out.outputs] == ref[:, len(ids):].tolist()


@pytest.fixture(scope="module")
def hybrid_ggufs(tiny_hybrids, tmp_path_factory):
    """Each tiny hybrid written by `pagedllm convert` as llama.cpp's GGUF (f32 and Q8_0); the same files
    llama.cpp 0.3.36 loads, its logits within 2e-4 of transformers' (checked by hand: llama.cpp is no test
    dependency)."""
    from pagedllm.tools.export import ConvertPlan, convert

    files = {}
    for family, (folder, _) in tiny_hybrids.items():
        out = tmp_path_factory.mktemp(f"gguf-{family}")
        for weight_type in ("f32", "q8_0"):
            convert(ModelSource("hf", Path(folder)), out / f"{weight_type}.gguf", ConvertPlan(quantize=weight_type))
        files[family] = out
    return files


@pytest.mark.parametrize("family", FAMILIES + ["lfm2_moe"])
def test_gguf_files_match_transformers(tiny_hybrids, hybrid_ggufs, family):
    """Through the GGUF loader: llama.cpp's names and forms (ssm_a = −e^A_log, convolutions without their
    middle axis, LFM2's per-layer kv heads, Qwen3.5's value heads tiled, Qwen3-Next's [b a] grouped) give
    the transformers model back: logits over three of the delta rule's chunks, greedy tokens; a Q8_0 file
    runs its packed kernels within quantisation noise."""
    _, model = tiny_hybrids[family]
    ids = random_prompt(150, 0)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    f32 = load_model(ModelSource("gguf", hybrid_ggufs[family] / "f32.gguf"))
    assert f32.config.linear_value_heads_tiled == family.startswith("qwen3_5")
    assert (prefill_logits(f32, ids, block_size=4) - ref).abs().max().item() < 1e-4
    q8 = load_model(ModelSource("gguf", hybrid_ggufs[family] / "q8_0.gguf"))
    assert (prefill_logits(q8, ids, block_size=4) - ref).abs().max().item() < 0.1
    llm = LLM(str(hybrid_ggufs[family] / "f32.gguf"), kv_cache_memory=2**20, block_size=4, max_num_batched_tokens=8)
    out = llm.generate({"prompt_token_ids": ids[:13]}, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert out[0].outputs[0].token_ids == greedy_reference(model, ids[:13], 12)


def _gguf_with(tiny_folder: Path, path: Path, name: str, change) -> Path:
    """The tiny Qwen3.5 as a GGUF file with one canonical tensor changed (value heads left in the file's
    order, so a tensor of the wrong size is written as it is)."""
    import dataclasses

    from pagedllm.tokenizer import load_tokenizer
    from pagedllm.tools.convert import write_gguf
    from pagedllm.tools.export import canonical_weights, gguf_tokenizer_metadata

    source = ModelSource("hf", tiny_folder)
    config, weights = canonical_weights(source)
    weights[name] = change(weights[name])
    write_gguf(path, dataclasses.replace(config, linear_value_heads_tiled=True), weights.items(),
               gguf_tokenizer_metadata(source, load_tokenizer(source)))
    return path


@pytest.mark.parametrize("name,change,message", [
    ("model.layers.0.linear_attn.conv1d.weight", lambda t: t[..., :3], r"conv1d.weight' has shape \(64, 1, 3\), "
                                                                        r"the model expects \(64, 1, 4\)"),
    ("model.layers.1.linear_attn.A_log", lambda t: t[:2], r"A_log' has shape \(2,\), the model expects \(4,\)"),
    ("model.layers.1.linear_attn.A_log", lambda t: torch.full_like(t, 100.0), "must be finite and negative"),
    ("model.layers.2.linear_attn.dt_bias", lambda t: t[None], r"dt_bias' has shape \(1, 4\)"),
])
def test_a_misshaped_or_corrupt_state_tensor_in_a_file_is_a_clear_error(tiny_hybrids, tmp_path, name, change, message):
    path = _gguf_with(Path(tiny_hybrids["qwen3_5"][0]), tmp_path / "bad.gguf", name, change)
    with pytest.raises(PagedLLMError, match=message):
        load_model(ModelSource("gguf", path))


def test_gguf_multi_token_prediction_blocks_are_not_loaded(tiny_hybrids, tmp_path):
    """A Qwen3.5 file carrying one MTP block past its layers (block_count 5, nextn_predict_layers 1, as
    llama.cpp's converter writes them) loads the 4 layers and gives the same logits."""
    import dataclasses

    from pagedllm.tokenizer import load_tokenizer
    from pagedllm.tools.convert import write_gguf
    from pagedllm.tools.export import canonical_weights, gguf_tokenizer_metadata

    folder, model = tiny_hybrids["qwen3_5"]
    source = ModelSource("hf", Path(folder))
    config, weights = canonical_weights(source)
    weights |= {name.replace("layers.3.", "layers.4."): t for name, t in weights.items() if ".layers.3." in name}
    longer = dataclasses.replace(config, num_hidden_layers=5, layer_mixers=config.layer_mixers + ("attention",))
    path = tmp_path / "mtp.gguf"
    write_gguf(path, longer, weights.items(), gguf_tokenizer_metadata(source, load_tokenizer(source))
               | {"qwen35.nextn_predict_layers": 1})
    ours = load_model(ModelSource("gguf", path))
    assert ours.config.num_hidden_layers == 4
    ids = random_prompt(24, 5)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    assert (prefill_logits(ours, ids, block_size=4) - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["lfm2", "qwen3_5", "qwen3_next"])
def test_cached_prefixes_resume_from_saved_states(tiny_hybrids, family):
    """Prefix caching for hybrids: a shared system prompt resumes from the state saved at its last snapshot
    point (every 2 blocks of 4 tokens here), the same prompt again from its last block, and a chat's next turn
    from the rolling snapshot its first turn left while decoding — each giving the cold run's tokens."""
    folder, model = tiny_hybrids[family]
    llm = LLM(str(folder), kv_cache_memory=2**20, block_size=4, state_snapshot_interval=2, max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    system, user = random_prompt(30, 11), random_prompt(7, 12)

    def run(ids: list[int]) -> tuple[list[int], int]:
        """The request's tokens (checked against transformers) and the prompt tokens it found cached."""
        before = llm.engine.kv_cache.stats.hit_tokens
        out = llm.generate({"prompt_token_ids": ids}, params)[0]
        assert out.outputs[0].token_ids == greedy_reference(model, ids, 12)
        return out.outputs[0].token_ids, llm.engine.kv_cache.stats.hit_tokens - before

    first, cached = run(system + user)
    assert cached == 0
    assert run(system + random_prompt(9, 13))[1] == 24  # the system prompt's last multiple of 2 blocks
    assert run(system + user)[1] == 36  # the whole prompt's last block (one token left to compute)
    assert run(system + user + first + random_prompt(5, 14))[1] == 48  # the first turn's last decoded block


@pytest.mark.parametrize("family", ["lfm2", "qwen3_5"])
def test_lora_on_every_projection_gives_peft_logits(tiny_hybrids, tmp_path, family):
    """A PEFT adapter on all linear layers — the recurrent mixers' in/out projections too — beside the base
    model in one step: each row gets its own logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from helpers import step_logits

    folder, model = tiny_hybrids[family]
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.mul_(3.0)
    peft.eval().save_pretrained(tmp_path / "a")
    llm = LLM(str(folder), kv_cache_memory=2**20, block_size=4, lora_modules={"a": str(tmp_path / "a")})
    ids = random_prompt(20, 4)
    ours, plain = step_logits(llm, [(ids, "a"), (ids, None)])
    with torch.no_grad():
        ref, base_ref = peft(torch.tensor([ids])).logits[0], model(torch.tensor([ids])).logits[0]
    assert (ref - base_ref).abs().max() > 0.05
    assert (ours - ref).abs().max().item() < 1e-4 and (plain - base_ref).abs().max().item() < 1e-4


def test_probes_show_the_recurrent_layers_too(tiny_hybrids, monkeypatch):
    """`inspect` on Qwen3.5: every layer's hidden states equal transformers', the prompt prefilled in slices of
    5 tokens (each continuing its recurrent states); an attention query on a Gated DeltaNet layer is refused."""
    from pagedllm.tools import inspect as inspect_module
    from pagedllm.tools.inspect import ProbeError, inspect_model
    from tools.test_inspect import _reference

    monkeypatch.setattr(inspect_module, "PREFILL_SLICE_TOKENS", 5)
    folder, model = tiny_hybrids["qwen3_5"]
    ids = random_prompt(12, 6)
    ours = inspect_model(load_model(ModelSource("hf", Path(folder))), ids, top_k=5, block_size=4, attention=["3:0"])
    for probe, expected in zip(ours.layers, _reference(model, ids, top_k=5), strict=True):
        assert torch.allclose(torch.tensor(probe.residual_norm), expected["norm"], rtol=1e-4)
        assert [[t for t, _ in row] for row in probe.top_k] == expected["ids"].tolist()
    assert len(ours.attention) == 1
    with pytest.raises(ProbeError, match="layer 0 is a gated delta net layer, not attention"):
        inspect_model(load_model(ModelSource("hf", Path(folder))), ids, attention=["0:0"])


def test_served_and_batched_as_any_model(tiny_hybrids, tmp_path):
    """A hybrid behind the OpenAI server (the engine core in its own process) streams what the offline engine
    generates, twice (the second from its saved prefix), and a batch job writes the same records."""
    import json

    import httpx

    from live_server import LiveServer
    from pagedllm import infer

    folder = str(tiny_hybrids["qwen3_5"][0])
    prompt = random_prompt(40, 8)
    want = LLM(folder, kv_cache_memory=2**20, block_size=4).generate(
        {"prompt_token_ids": prompt}, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].outputs[0].text
    with LiveServer(folder, kv_cache_memory=2**20, block_size=4) as live, httpx.Client(base_url=live.url) as http:
        for _ in range(2):
            answer = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0,
                                                        "ignore_eos": True}, timeout=60)
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["text"] == want
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"id": "a", "prompt": prompt, "max_tokens": 8, "ignore_eos": True}) + "\n")
    summary = infer(folder, rows, tmp_path / "out.jsonl", 1, sampling_params=SamplingParams(temperature=0.0),
                    engine_options={"kv_cache_memory": 2**20, "block_size": 4}, progress=False)
    assert summary.errors == 0
    assert json.loads((tmp_path / "out.jsonl").read_text())["text"] == want


def test_a_peft_adapter_on_a_tiled_gguf_is_refused_clearly(tiny_hybrids, hybrid_ggufs, tmp_path):
    """Qwen3.5's GGUF tiles the delta net's value heads (4 value heads over 2 key heads here); a PEFT adapter on
    those projections is in the checkpoint's grouped order: refused with the reason, not applied out of order."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder, _ = tiny_hybrids["qwen3_5"]
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=2, target_modules=["in_proj_z"])).save_pretrained(tmp_path / "a")
    with pytest.raises(PagedLLMError, match="tiles"):
        LLM(str(hybrid_ggufs["qwen3_5"] / "f32.gguf"), kv_cache_memory=2**20, lora_modules={"a": str(tmp_path / "a")})


class _Metadata:
    """A GGUF file's metadata and tensor names only, as gguf_mixers reads them."""

    def __init__(self, metadata: dict, tensors=()):
        self.path, self.metadata, self.tensors = "bad.gguf", metadata, dict.fromkeys(tensors)

    def get(self, key, default=None):
        return self.metadata.get(key, default)

    def require(self, key):
        from pagedllm.models.loaders.gguf_file import GGUFError

        if key not in self.metadata:
            raise GGUFError(f"{self.path}: required metadata key {key!r} is missing")
        return self.metadata[key]


_DELTA_KEYS = {"qwen35.ssm.conv_kernel": 4, "qwen35.ssm.state_size": 8, "qwen35.ssm.group_count": 2,
               "qwen35.ssm.time_step_rank": 4, "qwen35.ssm.inner_size": 32}


@pytest.mark.parametrize("arch,changes,message", [
    ("lfm2", {"lfm2.attention.head_count_kv": 2}, "one count per layer"),
    ("lfm2", {"lfm2.attention.head_count_kv": np.zeros(4, np.uint32)}, "some of them positive"),
    ("lfm2", {"lfm2.attention.head_count_kv": np.array([2, 0], np.uint32)}, "one count per layer"),
    ("lfm2", {"lfm2.attention.head_count_kv": np.array([0, 0, 2, 0], np.uint32),
              "lfm2.shortconv.l_cache": 2**40}, "positive count"),
    ("qwen35", {"qwen35.ssm.inner_size": 30}, "not a multiple"),
    ("qwen35", {"qwen35.ssm.time_step_rank": -4}, "positive count"),
    ("qwen35", {"qwen35.ssm.group_count": 1.5}, "positive count"),
    ("qwen35", {"qwen35.ssm.state_size": None}, "positive count"),
    ("qwen35", {"qwen35.attention.recurrent_layers": np.array([True, False])}, "one flag per layer"),
    ("qwen35", {"qwen35.attention.recurrent_layers": "tttf"}, "one flag per layer"),
    ("qwen35", {"qwen35.full_attention_interval": 0}, "positive count"),
])
def test_hostile_hybrid_metadata_is_a_clear_error(arch, changes, message):
    from pagedllm.models.loaders.gguf_file import GGUFError
    from pagedllm.models.loaders.gguf_mixers import gguf_mixer_fields
    from pagedllm.models.registry import family_for_gguf

    metadata = {**({"lfm2.shortconv.l_cache": 3} if arch == "lfm2" else _DELTA_KEYS), **changes}
    metadata = {k: v for k, v in metadata.items() if v is not None}
    with pytest.raises(GGUFError, match=message):
        gguf_mixer_fields(_Metadata(metadata), arch, family_for_gguf(arch), 4)


@pytest.mark.parametrize("extra", [4, 9, -1, True, 2**63])
def test_hostile_multi_token_prediction_counts_are_refused(extra):
    from pagedllm.models.loaders.gguf_file import GGUFError
    from pagedllm.models.loaders.gguf_mixers import gguf_layer_count

    with pytest.raises(GGUFError, match="nextn_predict_layers"):
        gguf_layer_count(_Metadata({"qwen35.nextn_predict_layers": extra}), "qwen35", 4)


def test_state_snapshot_interval_is_checked():
    from pagedllm.config import CacheConfig

    for bad in (0, -3, 2**20, 1.5, True):
        with pytest.raises(ConfigError, match="state snapshot interval"):
            CacheConfig(state_snapshot_interval=bad)


def test_tensor_parallel_2_gives_single_process_logits(tiny_hybrids, hybrid_ggufs, tmp_path):
    """Each family split over 2 ranks (heads or channels, with their states and convolutions), through both
    loaders — Qwen3.5's GGUF value heads tiled, so each rank's value rows are strided in the file."""
    import torch.multiprocessing as mp

    from pagedllm.engine.parallel import free_port
    from helpers import rank_prefill_logits

    sources = [source for family in FAMILIES + ["lfm2_moe"]
               for source in (ModelSource("hf", Path(tiny_hybrids[family][0])),
                              ModelSource("gguf", hybrid_ggufs[family] / "f32.gguf"))]
    ids = random_prompt(70, 3)  # two of the delta rule's chunks
    mp.spawn(rank_prefill_logits, args=(2, free_port(), sources, ids, tmp_path / "logits.pt"), nprocs=2, join=True)
    for source, logits in zip(sources, torch.load(tmp_path / "logits.pt")):
        assert (logits - prefill_logits(load_model(source), ids, block_size=4)).abs().max().item() < 1e-4, source


@pytest.mark.parametrize("family", ["lfm2", "qwen3_5"])
def test_tensor_parallel_engine_generates_as_one_process(tiny_hybrids, hybrid_ggufs, family):
    """The engine over 2 ranks: chunked prefill, forks (n = 3) and prefix hits copy every rank's state slots
    (rank 0 sends the copies with the step), and its tokens are transformers'."""
    folder, model = tiny_hybrids[family]
    path = hybrid_ggufs[family] / "f32.gguf" if family == "qwen3_5" else folder
    llm = LLM(str(path), kv_cache_memory=2**20, block_size=4, max_num_batched_tokens=8, state_snapshot_interval=2,
              tensor_parallel_size=2)
    try:
        prompts = [random_prompt(13, 21), random_prompt(13, 21)[:9] + random_prompt(6, 22)]  # the second hits the first's 2 blocks
        for ids in prompts:
            out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=10, temperature=0,
                                                                         ignore_eos=True, n=3))[0]
            assert [o.token_ids for o in out.outputs] == [greedy_reference(model, ids, 10)] * 3
        assert llm.engine.kv_cache.stats.hit_tokens == 8
    finally:
        llm.engine.runner.shutdown()


def test_tensor_parallel_refuses_more_ranks_than_linear_key_heads(tiny_hybrids):
    with pytest.raises(PagedLLMError, match="2 linear-attention key heads cannot be split over 4 ranks"):
        LLM(str(tiny_hybrids["qwen3_5"][0]), kv_cache_memory=2**20, tensor_parallel_size=4)


def test_fused_decode_runs_gated_attention_and_delta_net_layers(hybrid_ggufs, monkeypatch):
    """Packed Qwen3.5 layers decode through the fused C++ path, the whole stack in one call a step (gated
    attention's output gate, Gated DeltaNet's in_proj → recurrent step → out_proj, the MLP): the tokens and
    their logprobs of the module path, three sequences at once."""
    from pagedllm.models.fused_decode import FusedDecodeModel

    llm = LLM(str(hybrid_ggufs["qwen3_5"] / "q8_0.gguf"), kv_cache_memory=2**20, block_size=4)
    model = llm.engine.model
    assert model.fused_model is not None and all(layer.fused.whole_only for layer in model.layers)
    calls = []
    whole = FusedDecodeModel.__call__
    monkeypatch.setattr(FusedDecodeModel, "__call__", lambda self, *a: calls.append(1) or whole(self, *a))
    prompts = [{"prompt_token_ids": random_prompt(n, n)} for n in (5, 9, 14)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    fused = [o.outputs[0] for o in llm.generate(prompts, params)]
    assert len(calls) >= 7  # every decode step
    model.drop_fused_decode()
    module = [o.outputs[0] for o in llm.generate(prompts, params)]

    def chosen(out) -> list[float]:
        return [step[token].logprob for step, token in zip(out.logprobs, out.token_ids)]

    for a, b in zip(fused, module):
        assert a.token_ids == b.token_ids
        assert np.allclose(chosen(a), chosen(b), atol=1e-4)
