"""gpt-oss (issue 37): attention sinks, alternating sliding windows, biased attention and router, clamped SwiGLU
experts, YaRN, and MXFP4 experts kept packed — against transformers on tiny random models, in both file kinds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants
from safetensors.torch import load_file, save_file

from pagedllm.layers.dequant import dequantize
from pagedllm.layers.quant import mxfp4_blocks, quantize_mxfp4
from pagedllm.models.loaders import ModelSource, load_model
from helpers import (assert_chunked_forked_and_cached_generation, assert_packed_close_where_routes_agree,
                     prefill_logits, random_prompt)

EXPERTS = 8


def _tiny_gpt_oss(folder: Path, default_gguf: Path, truncate: bool):
    """4 layers (windows of 8 on the even ones) of 4 heads of 16, 8 experts of 64 (2 a token); norms, biases and
    sinks moved off their initial values so that each part shows."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    from conftest import TINY, _save_tokenizer

    rope = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": truncate,
            "original_max_position_embeddings": 4096, "rope_theta": 150000.0}
    config = GptOssConfig(**{**TINY, "num_hidden_layers": 4, "intermediate_size": 64}, head_dim=16,
                          num_local_experts=EXPERTS, num_experts_per_tok=2, sliding_window=8, rope_parameters=rope)
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "bias" in name or "sinks" in name:
                param.add_(torch.randn_like(param) * 0.5)
    model.save_pretrained(folder)
    _save_tokenizer(folder, default_gguf)
    return model


@pytest.fixture(scope="module")
def tiny_gpt_oss(tmp_path_factory, default_gguf):
    """As transformers writes gpt-oss: YaRN without truncated ramp ends."""
    folder = tmp_path_factory.mktemp("tiny-gpt-oss")
    return folder, _tiny_gpt_oss(folder, default_gguf, truncate=False)


@pytest.fixture(scope="module")
def truncated_gpt_oss(tmp_path_factory, default_gguf):
    """The same with YaRN's ramp truncated, the only form GGUF files (llama.cpp) know."""
    folder = tmp_path_factory.mktemp("tiny-gpt-oss-truncated")
    return folder, _tiny_gpt_oss(folder, default_gguf, truncate=True)


def _reference(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_logits_match_transformers(tiny_gpt_oss):
    folder, model = tiny_gpt_oss
    ours = load_model(ModelSource("hf", folder))
    config = ours.config
    assert config.attention_sinks and config.router_bias and config.hidden_act == "swiglu_oai"
    assert config.sliding_layers == (True, False, True, False) and not config.rope_scaling.truncate
    for length in (6, 40):  # within and well past the window
        ids = random_prompt(length, length)
        assert (prefill_logits(ours, ids, block_size=4) - _reference(model, ids)).abs().max().item() < 1e-4


def test_generates_as_transformers_in_chunks_and_from_a_cached_prefix(tiny_gpt_oss):
    """Prefill chunks of 8 tokens (the fused prefill kernel, with sinks and windows) and decode (the decode
    kernel), n = 2 forks, and a request resuming from the first one's cached prefix."""
    assert_chunked_forked_and_cached_generation(*tiny_gpt_oss)


def _openai_checkpoint(source: Path, out: Path) -> None:
    """`source`'s experts as OpenAI's release stores them: `_blocks` / `_scales` (gate and up rows interleaved,
    two FP4 values a byte, the even one low), the rest float — made by quantising the float experts."""
    tensors = load_file(str(source / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        stack = tensors.pop(name).transpose(1, 2)  # [experts, out, in]
        blocks = torch.stack([quantize_mxfp4(w) for w in stack]).view(*stack.shape[:2], -1, 17)
        index = torch.stack([blocks[..., 1:] & 0x0F, blocks[..., 1:] >> 4], dim=-2).flatten(-2)  # value order
        tensors[f"{name}_blocks"] = (index[..., 0::2] | index[..., 1::2] << 4).contiguous()
        tensors[f"{name}_scales"] = blocks[..., 0].contiguous()
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    for extra in source.iterdir():
        if extra.suffix == ".json":
            (out / extra.name).write_bytes(extra.read_bytes())


def test_mxfp4_repacking_matches_transformers_dequantisation(tiny_gpt_oss, tmp_path):
    """OpenAI's blocks and scales → llama.cpp's MXFP4 blocks: dequantised, the values transformers' own
    dequantisation gives; and our MXFP4 quantiser writes the gguf package's bytes."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    _openai_checkpoint(tiny_gpt_oss[0], tmp_path / "mx")
    tensors = load_file(str(tmp_path / "mx" / "model.safetensors"))
    blocks, scales = (tensors[f"model.layers.1.mlp.experts.gate_up_proj_{kind}"] for kind in ("blocks", "scales"))
    expected = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [experts, in, out]
    ours = mxfp4_blocks(blocks, scales)  # [experts, out, groups · 17]
    for e in range(EXPERTS):
        values = dequantize(ours[e].numpy(), GGMLQuantizationType.MXFP4, (ours.shape[1], 32 * blocks.shape[2]))
        torch.testing.assert_close(values, expected[e].t(), rtol=0, atol=0)
    weights = torch.randn(6, 64, generator=torch.Generator().manual_seed(3)) * 0.05
    reference = gguf_quants.quantize(weights.numpy(), GGMLQuantizationType.MXFP4)
    assert np.array_equal(quantize_mxfp4(weights).numpy(), reference)


def test_mxfp4_checkpoint_runs_packed(tiny_gpt_oss, tmp_path):
    """The MXFP4 checkpoint keeps its experts packed (the MXFP4 kernels), within the packed tolerance of the
    same weights dequantised, which equal transformers on them."""
    from transformers import AutoModelForCausalLM

    folder, _ = tiny_gpt_oss
    _openai_checkpoint(folder, tmp_path / "mx")
    packed = load_model(ModelSource("hf", tmp_path / "mx"))
    experts = packed.layers[0].mlp.experts
    assert packed.packed_weights and experts[0].gate_up_proj.method.__class__.__name__ == "PackedMethod"
    assert {int(t) for t in experts[3].down_proj.part_types} == {int(GGMLQuantizationType.MXFP4)}
    dense = load_model(ModelSource("hf", tmp_path / "mx"), quantization="none")
    # transformers on the dequantised experts (its own MXFP4 path needs a GPU's kernels)
    reference = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            for proj in ("gate_up_proj", "down_proj"):
                stack = getattr(dense.layers[i].mlp, "experts")
                if proj == "down_proj":
                    rows = torch.stack([stack[e].down_proj.weight for e in range(EXPERTS)])
                else:
                    gate_up = torch.stack([stack[e].gate_up_proj.weight for e in range(EXPERTS)])  # [E, 2w, in]
                    gate, up = gate_up.chunk(2, dim=1)
                    rows = torch.stack([gate, up], dim=2).flatten(1, 2)  # interleaved again
                getattr(layer.mlp.experts, proj).copy_(rows.transpose(1, 2))
    ids = random_prompt(30, 2)
    assert (prefill_logits(dense, ids, block_size=4) - _reference(reference, ids)).abs().max().item() < 1e-4
    assert_packed_close_where_routes_agree(packed, dense, ids, block_size=4)


@pytest.fixture(scope="module")
def gpt_oss_ggufs(truncated_gpt_oss, tmp_path_factory):
    """The tiny model written by `pagedllm convert` in llama.cpp's gpt-oss layout: f32, and mxfp4_moe (experts
    MXFP4, the other matrices Q8_0)."""
    from pagedllm.tools.export import ConvertPlan, convert

    out = tmp_path_factory.mktemp("gguf-gpt-oss")
    for weight_type in ("f32", "mxfp4_moe"):
        convert(ModelSource("hf", truncated_gpt_oss[0]), out / f"{weight_type}.gguf", ConvertPlan(quantize=weight_type))
    return out


def test_gguf_files_match_transformers(truncated_gpt_oss, gpt_oss_ggufs):
    from pagedllm.models.loaders.gguf_file import GGUFFile

    _, model = truncated_gpt_oss
    f = GGUFFile(gpt_oss_ggufs / "mxfp4_moe.gguf")
    assert f.metadata["general.architecture"] == "gpt-oss"
    assert f.tensors["blk.0.ffn_gate_exps.weight"].ggml_type == GGMLQuantizationType.MXFP4
    assert f.tensors["blk.0.attn_q.weight"].ggml_type == GGMLQuantizationType.Q8_0
    assert {"blk.1.attn_sinks.weight", "blk.1.ffn_gate_inp.bias", "blk.1.ffn_down_exps.bias"} <= set(f.tensors)
    ids = random_prompt(40, 7)
    ref = _reference(model, ids)
    f32 = load_model(ModelSource("gguf", gpt_oss_ggufs / "f32.gguf"))
    assert f32.config.sliding_layers == (True, False, True, False) and f32.config.attention_sinks
    assert (prefill_logits(f32, ids, block_size=4) - ref).abs().max().item() < 1e-4
    mxfp4 = ModelSource("gguf", gpt_oss_ggufs / "mxfp4_moe.gguf")
    assert_packed_close_where_routes_agree(load_model(mxfp4), load_model(mxfp4, quantization="none"), ids, block_size=4)


def test_an_mxfp4_checkpoint_converts_with_its_blocks_as_they_are(tiny_gpt_oss, tmp_path):
    """`convert` of the MXFP4 checkpoint to GGUF copies its expert blocks (as llama.cpp's converter repacks them),
    so the file runs exactly as the checkpoint does; its untruncated YaRN is written as llama.cpp writes it."""
    from pagedllm.models.loaders.gguf_file import GGUFFile
    from pagedllm.tools.export import ConvertPlan, convert

    _openai_checkpoint(tiny_gpt_oss[0], tmp_path / "mx")
    convert(ModelSource("hf", tmp_path / "mx"), tmp_path / "mx.gguf", ConvertPlan(quantize="f32"))
    f = GGUFFile(tmp_path / "mx.gguf")
    assert f.tensors["blk.2.ffn_down_exps.weight"].ggml_type == GGMLQuantizationType.MXFP4
    hf = load_model(ModelSource("hf", tmp_path / "mx"))
    gguf = load_model(ModelSource("gguf", tmp_path / "mx.gguf"))
    for e in (0, 5):
        for proj in ("gate_up_proj", "down_proj"):
            ours = [p.data for p in getattr(gguf.layers[2].mlp.experts[e], proj).parts]
            theirs = [p.data for p in getattr(hf.layers[2].mlp.experts[e], proj).parts]
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert json.loads((tmp_path / "mx" / "config.json").read_text())["rope_parameters"]["truncate"] is False


def test_one_token_through_packed_experts_matches_the_module_path(gpt_oss_ggufs):
    """A step of one token (one stream decoding) takes the MoE layer's few-call path over packed experts
    (stacked gate/up rows, batched activations): the same numbers, bit for bit, as each expert's modules."""
    from pagedllm.layers.moe import SparseMoE

    model = load_model(ModelSource("gguf", gpt_oss_ggufs / "mxfp4_moe.gguf"))
    moe = next(m for m in model.modules() if isinstance(m, SparseMoE))
    for seed in range(3):
        x = torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
        weights, experts = moe.route(x)
        ids = sorted(experts[0].tolist())
        order = torch.argsort(experts.reshape(-1), stable=True)
        modules = torch.cat([moe.experts[e](x) for e in ids]).float() * weights.reshape(-1)[order, None]
        expected = torch.zeros_like(x).index_add_(0, torch.zeros(len(ids), dtype=torch.long), modules)
        assert torch.equal(moe.experts_output(x, weights, experts), expected)
