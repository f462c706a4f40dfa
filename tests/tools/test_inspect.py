"""Probes against the same quantities computed from transformers' output_hidden_states (fp32)."""

from __future__ import annotations

import pytest
import torch

from pagedllm.models.loaders import ModelSource, load_model
from pagedllm.tools import inspect as inspect_module
from pagedllm.tools.inspect import inspect_model

FAMILIES = ["llama", "qwen2", "gemma2", "phi3"]


def _reference(hf_model, ids: list[int], top_k: int) -> list[dict]:
    """Per layer, from transformers: the input is hidden_states[i]; the output hidden_states[i + 1],
    except the last, which transformers gives after the final norm (its un-normed output is
    rebuilt by running the last layer's hook)."""
    outputs = {}
    last = hf_model.model.layers[-1]
    handle = last.register_forward_hook(
        lambda _m, _a, out: outputs.setdefault("last", out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        result = hf_model(torch.tensor([ids]), output_hidden_states=True)
    handle.remove()
    states = [h[0] for h in result.hidden_states[:-1]] + [outputs["last"][0]]
    layers = []
    for i in range(len(states) - 1):
        before, after = states[i], states[i + 1]
        with torch.no_grad():
            logits = hf_model.lm_head(hf_model.model.norm(after)).float()
        cap = getattr(hf_model.config, "final_logit_softcapping", None)
        lens = torch.log_softmax(logits if cap is None else torch.tanh(logits / cap) * cap, dim=-1)
        values, token_ids = lens.topk(top_k, dim=-1)
        layers.append({"cos": 1 - torch.nn.functional.cosine_similarity(before, after, dim=-1),
                       "norm": after.norm(dim=-1), "ids": token_ids, "logprobs": values})
    return layers


@pytest.mark.parametrize("family,sliced", [(f, False) for f in FAMILIES] + [("gemma2", True)])
def test_probes_equal_transformers_hidden_states(tiny_models, family, sliced, monkeypatch):
    """`sliced`: the prefill in chunks of 5 tokens and the lens 4 rows a slice, as the core runs them."""
    if sliced:
        monkeypatch.setattr(inspect_module, "PREFILL_SLICE_TOKENS", 5)
        monkeypatch.setattr(inspect_module, "LENS_SLICE_ROWS", 4)
    tiny = tiny_models[family]
    ids = torch.randint(3, 49152, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    ours = inspect_model(load_model(ModelSource("hf", tiny.hf_dir)), ids, top_k=5, block_size=4)
    ref = _reference(tiny.hf_model, ids, top_k=5)
    assert [p.layer for p in ours.layers] == list(range(len(ref)))
    for probe, expected in zip(ours.layers, ref):
        assert torch.allclose(torch.tensor(probe.cos_distance), expected["cos"], atol=1e-4)
        assert torch.allclose(torch.tensor(probe.residual_norm), expected["norm"], rtol=1e-4)
        assert [[t for t, _ in row] for row in probe.top_k] == expected["ids"].tolist()
        assert torch.allclose(torch.tensor([[lp for _, lp in row] for row in probe.top_k]), expected["logprobs"],
                              atol=1e-4)


def test_chosen_layers_and_their_errors(tiny_models):
    model = load_model(ModelSource("hf", tiny_models["llama"].hf_dir))
    chosen = inspect_model(model, [5, 6, 7], layers=[1, 0], top_k=3)
    assert [p.layer for p in chosen.layers] == [0, 1]
    summary = chosen.as_json()["layers"][0]
    assert set(summary) == {"layer", "cos_distance", "residual_norm", "top_k"} and len(summary["top_k"]) == 3
    with pytest.raises(ValueError, match="layers"):
        inspect_model(model, [5, 6], layers=[99])
    with pytest.raises(ValueError, match="empty"):
        inspect_model(model, [])


def test_llm_inspect_on_the_default_model_leaves_generation_alone():
    from pagedllm import LLM, SamplingParams

    llm = LLM(kv_cache_memory=16 * 2**20)
    params = SamplingParams(max_tokens=8, temperature=0)
    before = llm.generate("The capital of France is", params)[0].token_ids
    probed = llm.inspect("The capital of France is", top_k=3)
    assert len(probed.layers) == llm.engine.model.config.num_hidden_layers
    last = probed.layers[-1].top_k[-1]
    assert last[0][0] == before[0]  # the last layer's lens is the model's own next-token choice
    assert llm.generate("The capital of France is", params)[0].token_ids == before
    # A short prompt runs through the fused C++ layers, which update the hidden states in place: the
    # probes must read what the module path reads (to the fused kernels' int8 activations: ~1%).
    layers = llm.engine.model.layers
    fused = [layer.fused for layer in layers]
    assert any(fused)
    try:
        for layer in layers:
            layer.fused = None
        modules = llm.inspect("The capital of France is", top_k=3)
    finally:
        for layer, f in zip(layers, fused):
            layer.fused = f
    for a, b in zip(probed.layers, modules.layers):
        assert a.cos_distance == pytest.approx(b.cos_distance, abs=0.03)
        assert a.residual_norm == pytest.approx(b.residual_norm, rel=0.03)


ATTENTION_FAMILIES = ["llama", "qwen2", "mistral", "gemma2", "gemma3", "phi3", "glm", "bloom"]


@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
def test_attention_weights_equal_transformers_eager_attentions(tiny_models, family):
    """Windows (mistral, gemma2/3, phi3), soft-capping (gemma2), multi-query heads (qwen2), interleaved
    partial rotary (glm), LongRoPE past its original context (phi3, 20 > 16 tokens) and ALiBi (bloom)."""
    tiny = tiny_models[family]
    ids = torch.randint(3, 49152, (20,), generator=torch.Generator().manual_seed(9)).tolist()
    model = load_model(ModelSource("hf", tiny.hf_dir))
    heads = model.config.num_attention_heads
    layers = model.config.num_hidden_layers
    probed = inspect_model(model, ids, layers=[0], attention=[f"{layer}" for layer in range(layers)] + ["1:2:-1:3"])
    with torch.no_grad():
        expected = tiny.hf_model(torch.tensor([ids]), output_attentions=True).attentions
    for probe in probed.attention[:layers]:
        assert probe.heads == list(range(heads)) and probe.queries == probe.keys == list(range(20))
        assert torch.allclose(torch.tensor(probe.weights), expected[probe.layer][0], atol=1e-5)
    single = probed.attention[-1]
    assert (single.heads, single.queries, single.keys) == ([2], [19], [3])
    assert single.weights[0][0][0] == pytest.approx(expected[1][0, 2, 19, 3].item(), abs=1e-5)


def test_attention_queries_parse_and_refuse():
    from pagedllm.tools.inspect import AttentionQuery, ProbeError

    assert AttentionQuery.parse("3") == AttentionQuery(3)
    assert AttentionQuery.parse("3:*:-1:0") == AttentionQuery(3, None, -1, 0)
    assert AttentionQuery.of((1, 2)) == AttentionQuery(1, 2)
    for bad in ("", "a:1", "1:2:3:4:5", "-1", "1:x"):
        with pytest.raises(ProbeError, match="attention"):
            AttentionQuery.parse(bad)
    with pytest.raises(ProbeError, match="attention"):
        AttentionQuery.of({"layer": 1})


def test_attention_probe_errors_name_the_problem(tiny_models):
    from pagedllm.tools.inspect import ProbeError

    model = load_model(ModelSource("hf", tiny_models["llama"].hf_dir))
    with pytest.raises(ProbeError, match="head 4 is out of range"):
        inspect_model(model, [5, 6, 7], attention=["0:4"])
    with pytest.raises(ProbeError, match="query token -4"):
        inspect_model(model, [5, 6, 7], attention=["0:0:-4"])
    with pytest.raises(ProbeError, match="layers"):
        inspect_model(model, [5, 6, 7], attention=["2"])
    with pytest.raises(ProbeError, match="top_k"):
        inspect_model(model, [5, 6, 7], top_k=0)


def test_numerics_diff_against_transformers_is_float_noise(tiny_models):
    from pagedllm.tools.inspect import compare_layers, load_reference

    source = ModelSource("hf", tiny_models["gemma2"].hf_dir)
    ids = list(range(100, 116))
    diff = compare_layers(load_model(source), load_reference(source, "transformers"), ids, block_size=4)
    assert [d.layer for d in diff.layers] == [0, 1]
    assert all(d.relative_error < 1e-5 and d.min_cosine > 1 - 1e-6 for d in diff.layers)
    assert diff.top1_agreement == 1.0 and abs(diff.kl_divergence) < 1e-6 and diff.logits_max_abs_error < 1e-4


def test_numerics_diff_shows_where_int4_drifts_from_float(tiny_models):
    """The quantised model against its own float path: every number is the comparison of the two
    models' layer outputs, as computed here by hand."""
    from pagedllm.tools.inspect import compare_layers, load_reference, pagedllm_outputs

    source = ModelSource("hf", tiny_models["llama"].hf_dir)
    ids = list(range(200, 220))
    quantised = load_model(source, quantization="int4")
    diff = compare_layers(quantised, load_reference(source, "float"), ids)
    ours, ref = pagedllm_outputs(quantised, ids), pagedllm_outputs(load_model(source), ids)
    for d, a, b in zip(diff.layers, ours.hidden, ref.hidden):
        assert d.relative_error == pytest.approx(float((a - b).norm() / b.norm()), rel=1e-5)
        assert d.relative_error > 1e-3  # Q4 blocks: a visible drift, not float noise
    assert diff.layers[-1].max_abs_error == pytest.approx(float((ours.hidden[-1] - ref.hidden[-1]).abs().max()))
    assert diff.top1_agreement == pytest.approx(
        float((ours.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean()))
    assert diff.kl_divergence > 0


def test_numerics_diff_refusals(tiny_models):
    from pagedllm.tools.inspect import ProbeError, compare_layers, load_reference

    gguf = ModelSource("gguf", tiny_models["llama"].gguf_path)
    with pytest.raises(ProbeError, match="Hugging Face folder"):
        load_reference(gguf, "transformers")
    wider = load_reference(ModelSource("hf", tiny_models["bloom"].hf_dir), "float")  # 96 wide, not 64
    with pytest.raises(ProbeError, match="the reference has 2 layers of width 96"):
        compare_layers(load_model(gguf), wider, [1, 2, 3])


def test_probe_budgets_refuse_what_would_stall_the_server():
    """Attention over 2,000 tokens came to a 471 MB response; the lens over 1,000 tokens stalled every other
    client ~24 s (issue 34). The server's core checks these budgets before computing anything."""
    from types import SimpleNamespace

    from pagedllm.tools.inspect import ProbeError, check_probe_budget

    smollm = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9)
    check_probe_budget(smollm, 300, None, ["29:*:*:*"])  # 9,000 lens cells, 810,000 weights
    with pytest.raises(ProbeError, match="layer-positions"):
        check_probe_budget(smollm, 1000, None, [])
    check_probe_budget(smollm, 2000, [0, 1], ["0:3:-1:*"])  # a few layers and one query row: fine
    with pytest.raises(ProbeError, match="attention weights"):
        check_probe_budget(smollm, 2000, [0], ["0:*:*:*"])


def test_attention_read_in_slices_equals_whole(tiny_models, monkeypatch):
    """gemma2 (two rotations, local and global): the rotations of every chunk, joined, are the prompt's."""
    model = load_model(ModelSource("hf", tiny_models["gemma2"].hf_dir))
    ids = torch.randint(3, 1000, (11,), generator=torch.Generator().manual_seed(8)).tolist()
    whole = inspect_model(model, ids, layers=[0], top_k=2, attention=["0:*:*:*", "1:1:-1:*"])
    monkeypatch.setattr(inspect_module, "PREFILL_SLICE_TOKENS", 3)
    sliced = inspect_model(model, ids, layers=[0], top_k=2, attention=["0:*:*:*", "1:1:-1:*"])
    for a, b in zip(whole.attention, sliced.attention):
        assert torch.allclose(torch.tensor(a.weights), torch.tensor(b.weights), atol=1e-5)
