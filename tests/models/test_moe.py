"""Mixture of experts: the batched expert computation against a per-token reference, and its cost
in expert calls as the step grows."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.layers.mlp import MLP
from pagedllm.layers.moe import SparseMoE
from pagedllm.models.loaders import ModelSource, load_model
from helpers import assert_same_or_near_tie


def _per_token_reference(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """Each token alone: its top-k experts one after another, weighted, plus the shared expert."""
    out = []
    for row in x.split(1):
        weights, experts = moe.route(row)
        y = sum(w * moe.experts[int(e)](row) for w, e in zip(weights[0], experts[0]))
        if moe.shared_expert is not None:
            gate = 1 if moe.shared_expert_gate is None else torch.sigmoid(moe.shared_expert_gate(row))
            y = y + gate * moe.shared_expert(row)
        out.append(y)
    return torch.cat(out)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe"])
def test_batched_experts_equal_per_token_reference(tiny_models, family):
    model = load_model(ModelSource("hf", tiny_models[family].hf_dir))
    moe = next(layer.mlp for layer in model.layers if isinstance(layer.mlp, SparseMoE))
    x = torch.randn(53, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        batched, reference = moe(x), _per_token_reference(moe, x)
    assert torch.allclose(batched, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_expert_calls_do_not_grow_with_the_step(tiny_models, tokens):
    """A step makes at most one call per expert that any of its tokens chose, however many tokens."""
    model = load_model(ModelSource("hf", tiny_models["qwen3_moe"].hf_dir))
    moe = model.layers[0].mlp
    calls = []
    hooks = [e.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0])) for e in moe.experts]
    x = torch.randn(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, chosen = moe.route(x)
        moe(x)
    for hook in hooks:
        hook.remove()
    assert len(calls) == len(chosen.unique()) <= min(len(moe.experts), tokens * moe.top_k)
    assert sum(calls) == tokens * moe.top_k  # every (token, expert) pair once


def test_moe_layers_and_dense_layers_mix(tmp_path):
    """Qwen-MoE's `mlp_only_layers` / `decoder_sparse_step`: those layers keep the dense MLP, as in transformers."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    from conftest import TINY
    from helpers import prefill_logits

    config = Qwen2MoeConfig(**{**TINY, "num_hidden_layers": 3}, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=32, shared_expert_intermediate_size=64, decoder_sparse_step=2)
    torch.manual_seed(6)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path)
    ours = load_model(ModelSource("hf", tmp_path))
    assert [type(layer.mlp) for layer in ours.layers] == [MLP, SparseMoE, MLP]
    ids = list(range(5, 25))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (prefill_logits(ours, ids) - ref).abs().max().item() < 1e-4


def test_moe_serves_a_batch(tiny_models):
    """Many sequences at once through the engine: each gets what it gets alone (float path)."""
    llm = LLM(str(tiny_models["qwen2_moe"].hf_dir), kv_cache_memory=8 * 2**20, block_size=4)
    prompts = [f"Request {i}: the experts of layer {i % 2} take" + " more" * i for i in range(6)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    together = [o.token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate(p, params)[0].token_ids for p in prompts]
    assert_same_or_near_tie(llm, prompts, alone, together)


def test_multi_token_prediction_tensors_are_not_loaded(tiny_models, tmp_path):
    """GLM-4.5's and DeepSeek V3's MTP blocks are layers past `num_hidden_layers`, Qwen3.5's are `mtp.*`: the
    loader skips both (pagedllm runs the main model), and the logits are the checkpoint's without them."""
    import shutil

    from safetensors.torch import save_file

    from helpers import prefill_logits

    tiny = tiny_models["glm4_moe"]
    folder = tmp_path / "with-mtp"
    shutil.copytree(tiny.hf_dir, folder)
    layers = tiny.hf_model.config.num_hidden_layers
    assert tiny.hf_model.config.num_nextn_predict_layers == 1
    save_file({f"model.layers.{layers}.eh_proj.weight": torch.ones(64, 128),
               f"model.layers.{layers}.input_layernorm.weight": torch.ones(64),
               "mtp.fc.weight": torch.ones(64, 128)}, folder / "model-mtp.safetensors")
    ids = list(range(40, 60))
    assert torch.equal(prefill_logits(load_model(ModelSource("hf", folder)), ids),
                       prefill_logits(load_model(ModelSource("hf", tiny.hf_dir)), ids))


@pytest.mark.parametrize("changes,message", [
    (dict(moe_scoring="softplus"), "expert scoring 'softplus' is not one of"),
    (dict(moe_groups=3), "8 experts in 3 groups"),
    (dict(moe_groups=4, moe_topk_groups=5), "expert groups must be positive integers"),
    (dict(moe_groups=4, moe_topk_groups=1), "cannot give 3 experts a token"),
    (dict(moe_groups=8), "8 experts in 8 groups"),
    (dict(routed_scaling_factor=float("nan")), "routed_scaling_factor must be a positive finite number"),
    (dict(routed_scaling_factor=0), "routed_scaling_factor must be a positive finite number"),
])
def test_hostile_routing_configs_are_refused(tiny_models, changes, message):
    import dataclasses

    from pagedllm.errors import ConfigError
    from pagedllm.models.loaders import read_model_config

    config, _ = read_model_config(ModelSource("hf", tiny_models["glm4_moe"].hf_dir))
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(config, **changes)
