"""`pagedllm convert --merge-lora`: the merged checkpoint gives the adapter's logits without the adapter."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from helpers import prefill_logits
from pagedllm.models.loaders import ModelSource, load_model
from test_adapters import _llm, _prompt, make_peft_adapter, peft_logits, step_logits


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagedllm.entrypoints.cli", "convert", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("family,out", [("llama", "merged"), ("phi3", "merged.gguf"), ("glm", "merged.gguf")])
def test_merged_equals_unmerged(tiny_models, tmp_path, family, out):
    """phi3 keeps q/k/v fused in its GGUF; glm's rotary pairs are interleaved (rows reordered in the model)."""
    tiny = tiny_models[family]
    peft_model = make_peft_adapter(tiny, tmp_path / "a", seed=4)
    result = _convert(str(tiny.hf_dir), "--out", str(tmp_path / out), "--merge-lora", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    ids = _prompt(16, 12)
    merged = prefill_logits(load_model(ModelSource("gguf" if out.endswith(".gguf") else "hf", tmp_path / out)), ids)
    (unmerged,) = step_logits(_llm(tiny.hf_dir, lora_modules={"a": str(tmp_path / "a")}), [(ids, "a")])
    assert (merged - unmerged).abs().max().item() < 1e-4
    with torch.no_grad():
        reference = peft_model.merge_and_unload()(torch.tensor([ids])).logits[0]
    assert (merged - reference).abs().max().item() < 1e-4


def test_merged_then_quantised(tiny_models, tmp_path):
    tiny = tiny_models["llama"]
    peft_model = make_peft_adapter(tiny, tmp_path / "a", seed=5)
    result = _convert(str(tiny.hf_dir), "--out", str(tmp_path / "q8.gguf"), "--quantize", "q8_0",
                      "--merge-lora", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    ids = _prompt(16, 13)
    quantised = prefill_logits(load_model(ModelSource("gguf", tmp_path / "q8.gguf")), ids)
    adapted, base = peft_logits(peft_model, ids), peft_logits(tiny.hf_model, ids)
    # Q8_0's rounding (mean |Δ| < 0.1 on this random model, whose merged weights are large), far below
    # what the adapter changes: the update survived the quantisation.
    error = (quantised - adapted).abs().mean().item()
    assert error < 0.1 and error < (adapted - base).abs().mean().item() / 5


def test_an_adapter_of_another_model_is_refused(tiny_models, tmp_path):
    make_peft_adapter(tiny_models["qwen2"], tmp_path / "qwen", seed=1)
    result = _convert(str(tiny_models["llama"].hf_dir), "--out", str(tmp_path / "x"), "--merge-lora", str(tmp_path / "qwen"))
    assert result.returncode == 2 and "another model" in result.stderr and "Traceback" not in result.stderr
