"""Packed GGML weights against the float path of the same file.

The packed path quantises activations to int8 blocks of 32 for up to INT8_MAX_ROWS rows (as
llama.cpp does) and multiplies dequantised bfloat16 tiles where the CPU has native bfloat16, so
it is not bit-exact. Stated tolerance: mean |Δlogit| ≤ 3% and max |Δlogit| ≤ 25% of the
logits' standard deviation; greedy tokens equal until the first position where the float
model's top two logits are closer than NEAR_TIE. The fused decode layer (one C++ call with the
decode kernel, or two around another attention backend) equals the module-by-module path to float
rounding.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from helpers import assert_packed_logits_close, prefill_logits
from pagedllm.engine.model_runner import ModelRunner, plan_kv_cache
from pagedllm.engine.sequence import Sequence
from pagedllm.engine.scheduler import ScheduledSequence
from pagedllm.attention import KV_Q8_0, cached_values
from pagedllm.layers.rotary import rope_cos_sin
from pagedllm.lora.adapter import LoRAAdapter, LoRAUpdate
from pagedllm.lora.layers import ModelAdapters, lora_targets
from pagedllm import LLM, SamplingParams
from pagedllm.kernels import ISA_NAMES, available_isas, quant_kernels_available
from pagedllm.layers.linear import Linear, PackedMethod, WeightLoadError
from pagedllm.layers.quant import PackedWeight, random_blocks
from pagedllm.models.fused_decode import FusedDecodeLayer
from pagedllm.models.loaders import ModelSource, load_model, read_model_config
from pagedllm.models.loaders.hf_loader import hf_weights
from pagedllm.tools.convert import write_gguf

pytestmark = pytest.mark.skipif(not quant_kernels_available(), reason="needs a C++ compiler for the CPU kernels")

Q = GGMLQuantizationType
FORMATS = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k", "q4_k_m"]
NEAR_TIE = 0.5
SHAPE = dict(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.05)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """Tiny random llama (q/k rows permuted in GGUF), qwen2 (biases, tied head), qwen3 (q/k norms) and
    glm (half of each head rotating, interleaved: reordered rows, zero frequencies) with rows of 256."""
    from transformers import AutoModelForCausalLM, GlmConfig, LlamaConfig, Qwen2Config, Qwen3Config

    folders = {}
    for family, config in {"llama": LlamaConfig(**SHAPE, tie_word_embeddings=False),
                           "qwen2": Qwen2Config(**SHAPE, tie_word_embeddings=True),
                           "qwen3": Qwen3Config(**SHAPE, head_dim=64, tie_word_embeddings=True),
                           "glm": GlmConfig(**SHAPE, head_dim=64, pad_token_id=0)}.items():
        torch.manual_seed(7)
        folder = tmp_path_factory.mktemp(f"packed-{family}")
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
        folders[family] = folder
    return folders


@pytest.fixture(scope="module")
def write(hf_folders, tmp_path_factory, default_tokenizer_metadata):
    def _write(family: str, weight_type: str) -> ModelSource:
        folder = hf_folders[family]
        path = tmp_path_factory.mktemp("gguf") / f"{family}-{weight_type}.gguf"
        config, _ = read_model_config(ModelSource("hf", folder))
        write_gguf(path, config, hf_weights(folder), default_tokenizer_metadata, weight_type=weight_type)
        return ModelSource("gguf", path)
    return _write


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("weight_type", FORMATS)
def test_packed_logits_match_the_float_path(write, family, weight_type):
    source = write(family, weight_type)
    packed, dense = load_model(source), load_model(source, quantization="none")
    linears = [m for m in packed.modules() if isinstance(m, Linear)]
    assert linears and all(isinstance(m.method, PackedMethod) for m in linears)
    assert packed.weight_bytes() < dense.weight_bytes() / 3
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    for length in (1, 7, 40):  # the int8 kernel, and dequantised tiles + GEMM past INT8_MAX_ROWS rows
        assert_packed_logits_close(prefill_logits(packed, ids[:length]), prefill_logits(dense, ids[:length]))


def _decode_step(model, runner: ModelRunner, rows: int):
    """A step of `rows` decodes at positions 1, 2, 3… (two blocks each) and a random layer input for it:
    (batch, x, cos, sin)."""
    requests = [ScheduledSequence(Sequence(f"r{i}", [5 + i] * (i + 2), SamplingParams()), 1) for i in range(rows)]
    for i, r in enumerate(requests):
        r.sequence.num_computed_tokens = i + 1
    batch = runner.prepare(requests, [[2 * i, 2 * i + 1] for i in range(rows)])
    x = torch.randn(rows, model.config.hidden_size, generator=torch.Generator().manual_seed(rows)) * 3
    return (batch, x, *rope_cos_sin(batch.positions, model.inv_freq, x.dtype))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "glm"])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("kv_dtype", [torch.float32, KV_Q8_0])
@pytest.mark.parametrize("backend", ["auto", "torch"])  # the decode kernel inside one C++ call, or two calls around torch
def test_fused_decode_layer_equals_the_module_path(write, family, rows, kv_dtype, backend):
    """Same layer, same input: output and the K/V it writes agree to float rounding (q4_k_m: q/k/v of
    different types in one product; qwen2: q/k/v biases; qwen3: per-head q/k norms; glm: partial
    rotation; a q8_0 pool written by both)."""
    model = load_model(write(family, "q4_k_m"))
    assert all(layer.fused is not None for layer in model.layers)
    spec = plan_kv_cache(model.config, 4, 2**20, kv_dtype)
    runners = [ModelRunner(model, spec, "cpu", torch.float32, backend, kv_dtype=kv_dtype) for _ in range(2)]
    batch, x, cos, sin = _decode_step(model, runners[0], rows)
    layer = model.layers[1]
    with torch.inference_mode():
        fused = layer.fused(x.clone(), cos, sin, runners[0].kv_caches[1], batch.meta)
        plain = layer(x.clone(), cos, sin, runners[1].kv_caches[1], batch.meta)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4 * plain.abs().max().item())
    written = [cached_values(runner.kv_caches[1], torch.float32) for runner in runners]
    step = written[1].abs().max().item() / 127 if kv_dtype == KV_Q8_0 else 0  # a k a hair apart may round apart
    torch.testing.assert_close(written[0], written[1], rtol=1e-5, atol=1e-5 + step)
    assert layer.fused.applies_to(x, batch.meta)


def _random_adapter(model, layer: int, seed: int, suffixes: tuple[str, ...] | None = None) -> LoRAAdapter:
    """Rank-4 random updates of layer `layer`'s projections (those ending in `suffixes`, or all)."""
    gen = torch.Generator().manual_seed(seed)
    targets = lora_targets(model)
    updates = {}
    for name, (linear, shard) in targets.items():
        if name.startswith(f"model.layers.{layer}.") and (suffixes is None or name.endswith(suffixes)):
            updates[name] = LoRAUpdate(torch.randn(4, linear.in_features, generator=gen) * 0.2,
                                       torch.randn(linear.shard_sizes[shard], 4, generator=gen) * 0.2)
    return LoRAAdapter(f"a{seed}", Path(f"a{seed}"), 4, updates)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("segments", ["one adapter", "two adapters and the base"])
def test_fused_decode_layer_with_lora_adapters_equals_the_module_path(write, backend, segments):
    """Steps with LoRA adapters keep the fused layer, which adds each adapter's updates to its rows of
    the four products: the module path's output and K/V, on every instruction set."""
    model = load_model(write("qwen2", "q4_k_m"))
    adapters = ModelAdapters(model)
    adapters.add(7, _random_adapter(model, 1, seed=4))
    adapters.add(8, _random_adapter(model, 1, seed=5, suffixes=("k_proj", "o_proj", "up_proj")))
    rows = 1 if segments == "one adapter" else 3
    step = [(7, None)] if rows == 1 else [(8, torch.tensor([2])), (7, torch.tensor([0]))]  # row 1: the base
    spec = plan_kv_cache(model.config, 4, 2**20, torch.float32)
    runners = [ModelRunner(model, spec, "cpu", torch.float32, backend) for _ in range(3)]
    batch, x, cos, sin = _decode_step(model, runners[0], rows)
    layer = model.layers[1]
    with torch.inference_mode(), adapters.context.applied(step):
        lora = layer.fused.lora_updates(adapters.context.segments)
        plain = layer(x.clone(), cos, sin, runners[1].kv_caches[1], batch.meta)
        base = layer.fused(x.clone(), cos, sin, runners[2].kv_caches[1], batch.meta)
        changed = (plain - base).abs().amax(-1) > 0.05 * plain.abs().max()  # per row: its adapter does change it
        assert changed.tolist() == ([True] if rows == 1 else [True, False, True])
        for isa in available_isas():  # the adapters' products are each instruction set's own loops
            layer.fused.isa = ISA_NAMES.index(isa)
            fused = layer.fused(x.clone(), cos, sin, runners[0].kv_caches[1], batch.meta, lora)
            torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4 * plain.abs().max().item(), msg=isa)
            torch.testing.assert_close(runners[0].kv_pool, runners[1].kv_pool, rtol=1e-5, atol=1e-5, msg=isa)


@pytest.mark.parametrize("adapters", [False, True])
def test_fused_model_runs_every_layer_in_one_call(write, adapters, monkeypatch):
    """A step of one query per sequence runs the whole stack in one C++ call (FusedDecodeModel): the
    same hidden states and K/V as the fused layers called one by one and, to float rounding, as the
    module path. With adapters: one on layer 0, another on layer 1 and a base row, so each layer's
    slice of the step's LoRA list is its own."""
    model = load_model(write("qwen2", "q4_k_m"))
    assert model.fused_model is not None
    context, step = contextlib.nullcontext, []
    if adapters:
        lora = ModelAdapters(model)
        lora.add(7, _random_adapter(model, 0, seed=4))
        lora.add(8, _random_adapter(model, 1, seed=5))
        context, step = lora.context.applied, [(8, torch.tensor([2])), (7, torch.tensor([0]))]
    spec = plan_kv_cache(model.config, 4, 2**20, torch.float32)
    runners = [ModelRunner(model, spec, "cpu", torch.float32) for _ in range(3)]
    batch, *_ = _decode_step(model, runners[0], 3)
    assert model.fused_model.applies_to(torch.zeros(3, model.config.hidden_size), batch.meta)

    def run(runner: ModelRunner) -> torch.Tensor:
        with torch.inference_mode(), context(step):
            return model(batch.input_ids, batch.positions, runner.kv_caches, batch.meta)

    with monkeypatch.context() as patch:  # the one call, not the layers one by one
        patch.setattr(FusedDecodeLayer, "__call__", lambda *a: pytest.fail("a layer was called on its own"))
        whole = run(runners[0])
    model.fused_model = None
    layer_by_layer = run(runners[1])
    model.drop_fused_decode()
    module = run(runners[2])
    assert torch.equal(whole, layer_by_layer) and torch.equal(runners[0].kv_pool, runners[1].kv_pool)
    torch.testing.assert_close(whole, module, rtol=1e-4, atol=1e-4 * module.abs().max().item())
    torch.testing.assert_close(runners[0].kv_pool, runners[2].kv_pool, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("isa", available_isas() if quant_kernels_available() else ())
def test_fused_decode_layer_on_every_instruction_set(write, isa):
    """The fused C++ layer through each kernel path this CPU has (portable, AVX2, AVX-512 VNNI): the
    same output as the module path, so an AVX2-only machine runs code that was checked here too."""
    model = load_model(write("glm", "q4_k_m"))
    spec = plan_kv_cache(model.config, 4, 2**20, torch.float32)
    runners = [ModelRunner(model, spec, "cpu", torch.float32) for _ in range(2)]
    batch, x, cos, sin = _decode_step(model, runners[0], 3)
    layer = model.layers[1]
    layer.fused.isa = ISA_NAMES.index(isa)
    with torch.inference_mode():
        fused = layer.fused(x.clone(), cos, sin, runners[0].kv_caches[1], batch.meta)
        plain = layer(x.clone(), cos, sin, runners[1].kv_caches[1], batch.meta)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4 * plain.abs().max().item())


def _assert_same_until_near_tie(model, prompt: list[int], want: list[int], have: list[int]) -> None:
    k = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), None)
    if k is None:
        return
    top2 = prefill_logits(model, prompt + want[:k])[-1].topk(2).values
    assert (top2[0] - top2[1]).item() < NEAR_TIE, (k, want, have)


@pytest.mark.parametrize("weight_type", ["q4_1", "q4_k_m"])
def test_greedy_tokens_match_until_a_near_tie(write, weight_type):
    source = write("llama", weight_type)
    prompt = torch.randint(0, 512, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outs = {}
    for quantization in ("auto", "none"):
        llm = LLM(str(source.path), kv_cache_memory=2**20, block_size=4, quantization=quantization)
        outs[quantization] = llm.generate({"prompt_token_ids": prompt}, params)[0].token_ids
    _assert_same_until_near_tie(load_model(source, quantization="none"), prompt, outs["none"], outs["auto"])


def test_default_model_runs_packed_close_to_float():
    from pagedllm.models.loaders import resolve_model

    source = resolve_model(None)
    packed, dense = load_model(source), load_model(source, quantization="none")
    ids = list(range(300, 340))
    # Its residual stream reaches ~26,000 in a few channels, so an int8 activation rounding that
    # flips either way moves its logits by ~3% of their spread: measured 1.6-3.2% on either path
    # (fused decode layer or module by module); a wrong kernel moves them by far more.
    for length in (1, 5, 40):
        assert_packed_logits_close(prefill_logits(packed, ids[:length]), prefill_logits(dense, ids[:length]), mean=0.04)
    assert packed.weight_bytes() <= source.path.stat().st_size


def test_int8_and_int4_quantise_hugging_face_weights_at_load(hf_folders):
    """Against the float weights themselves, so the tolerance includes rounding the weights (4 bits: a lot)."""
    source = ModelSource("hf", hf_folders["qwen2"])
    dense = load_model(source)
    ids = list(range(3, 43))
    for quantization, mean, peak in (("int8", 0.03, 0.25), ("int4", 0.3, 1.5)):
        model = load_model(source, quantization=quantization)
        assert isinstance(model.layers[0].mlp.down_proj.method, PackedMethod)
        assert_packed_logits_close(prefill_logits(model, ids), prefill_logits(dense, ids), mean, peak)
    assert load_model(source, quantization="int4").weight_bytes() < load_model(source, quantization="int8").weight_bytes()


def test_int8_on_a_gguf_file_is_refused(write):
    from pagedllm.errors import ModelSourceError

    with pytest.raises(ModelSourceError, match="applies to Hugging Face"):
        load_model(write("llama", "q8_0"), quantization="int8")


def test_a_type_without_a_kernel_is_repacked_to_q8_0():
    """Q2_K (and every other GGML type with no kernel) runs as Q8_0, computed from the reference dequantisation."""
    from gguf import quants as gguf_quants

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (4 * 256 // 256, 84), dtype=np.uint8)
    raw[:, 80:84] = np.array([0.01, 0.002], dtype=np.float16).view(np.uint8)  # finite d and dmin
    layer = Linear(256, 4, method=PackedMethod())
    layer.load_shard(0, PackedWeight(Q.Q2_K, torch.from_numpy(raw.reshape(4, -1)), 256), "w")
    layer.method.finish(layer)
    assert layer.parts[0].qtype == Q.Q8_0
    ref_w = torch.from_numpy(gguf_quants.dequantize(raw, Q.Q2_K).reshape(4, 256))
    x = torch.randn(3, 256)
    torch.testing.assert_close(layer(x), x @ ref_w.T, rtol=0.02, atol=0.02 * (x @ ref_w.T).abs().max().item())


def test_a_packed_tensor_of_the_wrong_shape_is_refused():
    layer = Linear(256, 4, method=PackedMethod())
    wrong = PackedWeight(Q.Q8_0, torch.from_numpy(random_blocks(Q.Q8_0, 5, 256, np.random.default_rng(0))).view(5, -1), 256)
    with pytest.raises(WeightLoadError, match="expects"):
        layer.load_shard(0, wrong, "blk.0.attn_q.weight")


def test_rss_after_loading_a_q4_0_model_stays_near_its_file_size(hf_folders, tmp_path_factory):
    """Weights are read from the mapped file in place: loading and running adds about the file, not a float copy."""
    from transformers import LlamaConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("rss")
    config = LlamaConfig(**{**SHAPE, "vocab_size": 16384, "hidden_size": 1024, "intermediate_size": 2816,
                            "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8})
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    ours, _ = read_model_config(ModelSource("hf", folder))
    path = folder / "model-q4_0.gguf"
    write_gguf(path, ours, hf_weights(folder), weight_type="q4_0")
    script = textwrap.dedent(f"""
        import psutil, sys, torch
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parents[1])!r})
        from helpers import assert_packed_logits_close, prefill_logits
        from pagedllm.kernels import ISA_NAMES, available_isas, quant_kernels_available
        from pagedllm.models.loaders import ModelSource, load_model
        quant_kernels_available()
        ops = torch.ops.pagedllm_quant  # warm the thread pool and allocator first: they are not the model
        ops.matmul_q8(ops.quantize_q8(torch.randn(2, 32), 0), [torch.zeros(4, 18, dtype=torch.uint8)], [2], 32,
                      torch.empty(2, 4), 0)
        torch.randn(64, 64) @ torch.randn(64, 64)
        before = psutil.Process().memory_info().rss
        model = load_model(ModelSource("gguf", {str(path)!r}))
        prefill_logits(model, list(range(8)))
        print(psutil.Process().memory_info().rss - before)
    """)
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    file_size = path.stat().st_size
    assert grown < 1.3 * file_size, (grown / 2**20, file_size / 2**20)
