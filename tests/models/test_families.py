"""Every family, through both loaders, against Hugging Face transformers (fp32)."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.kernels import quant_kernels_available
from pagedllm.engine.model_runner import ModelRunner, plan_kv_cache
from pagedllm.engine.sequence import Sequence
from pagedllm.engine.scheduler import ScheduledSequence
from pagedllm.layers.linear import Linear, PackedMethod
from pagedllm.models.loaders import ModelSource, load_model, read_model_config
from pagedllm.models.loaders.hf_loader import hf_weights
from pagedllm.tools.convert import write_gguf
from helpers import assert_packed_close_where_routes_agree, prefill_logits

FAMILIES = ["llama", "qwen2", "mistral", "qwen3", "phi3", "mixtral", "qwen2_moe", "qwen3_moe", "glm", "glm4", "glm4_moe", "seed_oss", "ernie4_5", "smollm3", "granite", "hunyuan_dense", "olmo2", "exaone4", "ministral", "ministral3", "ernie4_5_moe",
            "bloom", "gemma", "gemma2", "gemma3"]
LOADERS = ["hf", "gguf"]


def _source(tiny, kind: str) -> ModelSource:
    return ModelSource("hf", tiny.hf_dir) if kind == "hf" else ModelSource("gguf", tiny.gguf_path)


def _prompt(length: int = 24, seed: int = 0) -> list[int]:
    return torch.randint(3, 49152, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tiny_models, family, loader):
    tiny = tiny_models[family]
    ids = _prompt()
    ours = prefill_logits(load_model(_source(tiny, loader)), ids, block_size=4)
    with torch.no_grad():
        ref = tiny.hf_model(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_32_greedy_tokens_match_transformers(tiny_models, family, loader):
    tiny = tiny_models[family]
    ids = _prompt(12, seed=1)
    source = tiny.hf_dir if loader == "hf" else tiny.gguf_path
    llm = LLM(str(source), kv_cache_memory=4 * 2**20, block_size=4)
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
    with torch.no_grad():
        ref = tiny.hf_model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert out.token_ids == ref[0, len(ids):].tolist()
    assert out.finish_reason == "length"


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_output_rows_prune_the_last_layer_to_the_same_states(tiny_models, family):
    """Asked for a few rows (a step's sampled ones), the forward pass returns exactly those rows of the
    full pass, and writes the same K/V for every token."""
    model = load_model(_source(tiny_models[family], "hf"))
    prompts = [_prompt(11, seed=2), _prompt(7, seed=3)]
    spec = plan_kv_cache(model.config, 4, 2**20, torch.float32)
    runners = [ModelRunner(model, spec, "cpu", torch.float32) for _ in range(2)]
    scheduled = [ScheduledSequence(Sequence(str(i), ids, SamplingParams()), len(ids)) for i, ids in enumerate(prompts)]
    tables = [list(range(0, 3)), list(range(3, 5))]
    full_batch, pruned_batch = (runner.prepare(scheduled, tables) for runner in runners)
    rows = torch.tensor([17, 10, 3])  # any rows, in any order
    full = model(full_batch.input_ids, full_batch.positions, runners[0].kv_caches, full_batch.meta)
    pruned = model(pruned_batch.input_ids, pruned_batch.positions, runners[1].kv_caches, pruned_batch.meta,
                   output_rows=rows)
    torch.testing.assert_close(pruned, full[rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runners[1].kv_pool, runners[0].kv_pool, rtol=0, atol=0)


@pytest.mark.skipif(not quant_kernels_available(), reason="needs a C++ compiler for the CPU kernels")
@pytest.mark.parametrize("family", FAMILIES)
def test_quantised_gguf_runs_packed(tiny_models, tmp_path, default_tokenizer_metadata, family):
    """Q8_0 (rows of 64 hold no K-quant blocks): every matrix but the routers packed, logits within the packed
    tolerance (tests/helpers.py) of the same file's float path (which the f32 files hold to transformers)."""
    tiny = tiny_models[family]
    config, _ = read_model_config(ModelSource("hf", tiny.hf_dir))
    path = tmp_path / f"{family}-q8_0.gguf"
    write_gguf(path, config, hf_weights(tiny.hf_dir), default_tokenizer_metadata, weight_type="q8_0")
    packed, dense = load_model(ModelSource("gguf", path)), load_model(ModelSource("gguf", path), quantization="none")
    routers = ("mlp.gate", "mlp.shared_expert_gate")  # kept float by the writer, as llama.cpp keeps them
    assert all(isinstance(m.method, PackedMethod) for name, m in packed.named_modules()
               if isinstance(m, Linear) and not name.endswith(routers))
    ids = _prompt()
    for length in (1, 24):  # the int8 kernel (and the fused layer where the family has one), then many rows
        assert_packed_close_where_routes_agree(packed, dense, ids[:length])


def test_sliding_window_changes_the_result(tiny_models):
    """The mistral window (8) is shorter than the prompt, so ignoring it must change logits."""
    model = load_model(ModelSource("hf", tiny_models["mistral"].hf_dir))
    ids = _prompt()
    windowed = prefill_logits(model, ids)
    for layer in model.layers:
        layer.self_attn.sliding_window = None
    assert (prefill_logits(model, ids) - windowed).abs().max().item() > 1e-3


def test_written_gguf_loads_in_transformers(tiny_models):
    """Our GGUF writer produces files transformers' own GGUF loader reads to the same model."""
    from transformers import AutoModelForCausalLM

    tiny = tiny_models["qwen2"]
    hf_from_gguf = AutoModelForCausalLM.from_pretrained(str(tiny.gguf_path.parent), gguf_file=tiny.gguf_path.name,
                                                        dtype=torch.float32)
    ids = torch.tensor([_prompt()])
    with torch.no_grad():
        assert (hf_from_gguf(ids).logits - tiny.hf_model(ids).logits).abs().max().item() < 1e-4


def test_readme_lists_every_family():
    """The README's family table: each family with its Hugging Face and GGUF architectures and an example."""
    from pathlib import Path

    from pagedllm.models.registry import FAMILIES

    readme = Path(__file__).resolve().parents[2] / "README.md"
    rows = {line.split("|")[1].strip(): line for line in readme.read_text().splitlines()
            if line.startswith("| ") and line.count("|") >= 5}
    for family in FAMILIES:
        row = rows.get(family.name)
        assert row is not None, f"README's family table has no row for {family.name}"
        for name in family.hf_architectures + family.gguf_architectures + (family.example,):
            assert name and name in row, (family.name, name)


def test_qwen2_per_layer_windows(tmp_path, default_tokenizer_metadata):
    """Qwen2's `use_sliding_window`: layers from `max_window_layers` on are windowed, as transformers has it."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from conftest import TINY

    config = Qwen2Config(**TINY, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    torch.manual_seed(5)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    hf.save_pretrained(tmp_path / "hf")
    ours, _ = read_model_config(ModelSource("hf", tmp_path / "hf"))
    assert ours.sliding_layers == (False, True)
    write_gguf(tmp_path / "m.gguf", ours, hf_weights(tmp_path / "hf"), default_tokenizer_metadata)
    ids = _prompt()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    for source in (ModelSource("hf", tmp_path / "hf"), ModelSource("gguf", tmp_path / "m.gguf")):
        assert (prefill_logits(load_model(source), ids) - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("family,rope", [
    ("qwen2", {"factor": 4.0, "original_max_position_embeddings": 64}),
    ("llama", {"factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16.0, "attention_factor": 1.3}),
    ("glm", {"factor": 2.0, "original_max_position_embeddings": 64, "partial_rotary_factor": 0.5}),
])
def test_yarn_for_any_rope_family(tmp_path, default_tokenizer_metadata, family, rope):
    """YaRN (transformers' `rope_type: yarn`) through both loaders, a GGUF written by tools/convert."""
    from transformers import AutoModelForCausalLM, GlmConfig, LlamaConfig, Qwen2Config

    from conftest import TINY

    config_class = {"qwen2": Qwen2Config, "llama": LlamaConfig, "glm": GlmConfig}[family]
    extra = {"head_dim": 32, "pad_token_id": 0} if family == "glm" else {}
    config = config_class(**TINY, **extra, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, **rope})
    torch.manual_seed(9)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    hf.save_pretrained(tmp_path / "hf")
    ours, _ = read_model_config(ModelSource("hf", tmp_path / "hf"))
    assert ours.rope_scaling.kind == "yarn"
    write_gguf(tmp_path / "m.gguf", ours, hf_weights(tmp_path / "hf"), default_tokenizer_metadata)
    ids = _prompt(40)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    for source in (ModelSource("hf", tmp_path / "hf"), ModelSource("gguf", tmp_path / "m.gguf")):
        assert (prefill_logits(load_model(source), ids) - ref).abs().max().item() < 1e-4


def test_tensor_parallelism_refuses_whole_projection_qk_norms(tiny_models):
    """OLMo 2's q/k norms span every head: a rank holding some heads cannot norm them alone (yet)."""
    from pagedllm import LLM
    from pagedllm.errors import PagedLLMError

    with pytest.raises(PagedLLMError, match="q/k norms over whole projections"):
        LLM(str(tiny_models["olmo2"].hf_dir), kv_cache_memory=2**20, tensor_parallel_size=2)


def test_a_yarn_attention_factor_is_written_where_llama_cpp_reads_it(tiny_models):
    """llama.cpp scales a YaRN rotation by rope.scaling.attn_factor × mscale(factor) (it recomputes
    yarn_attn_factor itself): Ministral 3's factor of 1 must go there to survive in llama.cpp, and come back."""
    from pagedllm.layers.rotary import yarn_mscale
    from pagedllm.models.loaders.gguf_file import GGUFFile

    tiny = tiny_models["ministral3"]
    scaling = read_model_config(ModelSource("hf", tiny.hf_dir))[0].rope_scaling
    assert scaling.attention_factor == 1.0 and scaling.factor == 4.0
    written = GGUFFile(tiny.gguf_path).metadata["mistral3.rope.scaling.attn_factor"]
    assert abs(written - 1.0 / yarn_mscale(4.0)) < 1e-6
    assert abs(read_model_config(ModelSource("gguf", tiny.gguf_path))[0].rope_scaling.attention_factor - 1.0) < 1e-6
