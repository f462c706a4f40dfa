"""Whole models on weight-only integer groups (the GPU's quantised method), run here on the CPU
with the Triton kernel under its interpreter: GGUF files of each kind and Hugging Face weights
quantised at load give the logits of the same weights in float (fp32 activations: only float16
scale rounding and summation order apart), and the method reports the bytes it really holds."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported

from helpers import prefill_logits
from pagedllm.attention.triton import triton_available
from pagedllm.layers import linear
from pagedllm.layers.dequant import dequantize
from pagedllm.layers.quant import QUANTIZE_AT_LOAD, quantize
from pagedllm.layers.weight_only import WeightOnlyMethod
from pagedllm.models.loaders import ModelSource, load_model, read_model_config
from pagedllm.models.loaders.hf_loader import hf_weights
from pagedllm.tools.convert import write_gguf

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed (make test installs it)")
SHAPE = dict(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.05)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(11)
    folder = tmp_path_factory.mktemp("weight-only-qwen2")
    AutoModelForCausalLM.from_config(Qwen2Config(**SHAPE, tie_word_embeddings=True),
                                     dtype=torch.float32).save_pretrained(folder)
    return folder


@pytest.fixture
def weight_only_here(monkeypatch):
    """The method the loader picks for a GPU, picked on the CPU."""
    monkeypatch.setattr(linear, "packed_method", lambda device, cols, quantize_to, output_head:
                        WeightOnlyMethod(quantize_to=quantize_to, device=device))


def _gguf(hf_folder, tmp_path, default_tokenizer_metadata, weight_type: str) -> ModelSource:
    path = tmp_path / f"{weight_type}.gguf"
    config, _ = read_model_config(ModelSource("hf", hf_folder))
    write_gguf(path, config, hf_weights(hf_folder), default_tokenizer_metadata, weight_type=weight_type)
    return ModelSource("gguf", path)


IDS = torch.randint(0, 2048, (20,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.mark.parametrize("weight_type", ["q8_0", "q4_0", "q4_k_m", "q6_k"])
def test_gguf_weights_run_as_groups(hf_folder, tmp_path, default_tokenizer_metadata, weight_only_here, weight_type):
    source = _gguf(hf_folder, tmp_path, default_tokenizer_metadata, weight_type)
    model, dense = load_model(source), load_model(source, quantization="none")
    linears = [m for m in model.modules() if isinstance(m, linear.Linear)]
    assert linears and all(isinstance(m.method, WeightOnlyMethod) for m in linears)
    assert model.weight_bytes() < dense.weight_bytes() / 2.5
    for length in (1, 20):
        got, want = prefill_logits(model, IDS[:length]), prefill_logits(dense, IDS[:length])
        torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-3 * want.abs().max().item())


@pytest.mark.parametrize("quantization,ratio", [("int8", 3.5), ("int4", 5.0)])
def test_hugging_face_weights_quantised_at_load(hf_folder, weight_only_here, quantization, ratio):
    """Against float weights that went through the same rounding (Q8_0 / Q4_1 blocks and back)."""
    source = ModelSource("hf", hf_folder)
    model, rounded = load_model(source, quantization=quantization), load_model(source, quantization="none")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, linear.Linear)
              and isinstance(m.method, WeightOnlyMethod)}
    assert {m.quantized.bits for m in layers.values()} == {8 if quantization == "int8" else 4}
    assert sum(m.method.weight_bytes(m) for m in layers.values()) * ratio < sum(
        m.in_features * m.out_features * 4 for m in layers.values())
    qtype = QUANTIZE_AT_LOAD[quantization]
    for name, layer in rounded.named_modules():
        if name in layers:
            blocks = quantize(layer.weight.data, qtype)
            layer.weight.data = dequantize(blocks.data.numpy(), qtype, blocks.shape)
    got, want = prefill_logits(model, IDS), prefill_logits(rounded, IDS)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())


def test_bfloat16_activations_on_the_torch_path(hf_folder, tmp_path, default_tokenizer_metadata, weight_only_here,
                                                monkeypatch):
    """A bfloat16 model (the GPU's usual dtype) over integer groups, through the dequantise-and-multiply
    path a device without Triton takes: dequantised embedding rows come back in the model's dtype."""
    from helpers import assert_packed_logits_close
    from pagedllm.layers import weight_only

    monkeypatch.setattr(weight_only, "use_triton", lambda device: False)
    source = _gguf(hf_folder, tmp_path, default_tokenizer_metadata, "q8_0")
    model = load_model(source, dtype=torch.bfloat16)
    dense = load_model(source, quantization="none")
    assert model.norm.weight.dtype == torch.bfloat16
    got = prefill_logits(model, IDS)
    assert got.dtype == torch.float32
    assert_packed_logits_close(got, prefill_logits(dense, IDS))
