"""Probes against the same quantities computed from transformers' output_hidden_states (fp32)."""

from __future__ import annotations

import pytest
import torch

from pagedllm.models.loaders import ModelSource, load_model
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


@pytest.mark.parametrize("family", FAMILIES)
def test_probes_equal_transformers_hidden_states(tiny_models, family):
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
