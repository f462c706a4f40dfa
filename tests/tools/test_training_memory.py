"""`pagedllm memory --train`: the estimate against what a transformers training step really holds —
parameters, gradients and AdamW states counted exactly, saved activations measured with autograd's
saved-tensor hooks (float32, SDPA attention as transformers runs it on the CPU)."""

from __future__ import annotations

import pytest
import torch

from pagedllm.entrypoints.cli import main
from pagedllm.models.loaders import ModelSource
from pagedllm.tools.memory import TrainingPlan, activation_elements, memory_report, training_memory

SEQ, BATCH = 64, 2


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    """Four layers and a small vocabulary, so that the layers' activations weigh more than the logits."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("small-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").train()


def _saved_activation_bytes(model) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one forward pass (weights excluded)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 1000, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    loss.backward()
    return sum(size for ptr, size in saved.items() if ptr not in weights)


def _state_bytes(model) -> tuple[int, int, int]:
    """Trainable weights, gradients and AdamW moments after one optimizer step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable)
    optimizer.step()
    moments = sum(t.nbytes for state in optimizer.state.values() for k, t in state.items() if k != "step")
    return sum(p.nbytes for p in trainable), sum(p.grad.nbytes for p in trainable), moments


def test_full_fine_tuning(small_llama):
    model = _load(small_llama)
    activations = _saved_activation_bytes(model)
    weights, gradients, moments = _state_bytes(model)
    report = memory_report(ModelSource("hf", small_llama))
    estimate = training_memory(report.config, report.num_parameters,
                               TrainingPlan("full", SEQ, BATCH, "adamw", "float32"))
    assert (estimate.weights, estimate.gradients, estimate.optimizer_states) == (weights, gradients, moments)
    assert estimate.master_weights == 0
    assert estimate.activations == pytest.approx(activations, rel=0.03)


def test_lora_fine_tuning(small_llama):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_load(small_llama), LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0))
    activations = _saved_activation_bytes(model)
    trainable, gradients, moments = _state_bytes(model)
    report = memory_report(ModelSource("hf", small_llama))
    estimate = training_memory(report.config, report.num_parameters,
                               TrainingPlan("lora", SEQ, BATCH, "adamw", "float32", lora_rank=8))
    assert estimate.trainable_parameters * 4 == trainable
    assert (estimate.gradients, estimate.optimizer_states) == (gradients, moments)
    assert estimate.weights == sum(p.nbytes for p in model.parameters())
    assert estimate.activations == pytest.approx(activations, rel=0.03)


def test_gradient_checkpointing_keeps_layer_inputs(small_llama):
    """The forward pass keeps each layer's input and the head's tensors; the estimate adds the one layer
    recomputed at a time in backward (the peak), so it lies between the two."""
    model = _load(small_llama)
    model.gradient_checkpointing_enable()
    kept = _saved_activation_bytes(model)
    report = memory_report(ModelSource("hf", small_llama))
    plan = TrainingPlan("full", SEQ, BATCH, "adamw", "float32", gradient_checkpointing=True)
    estimate = training_memory(report.config, report.num_parameters, plan).activations
    one_layer = activation_elements(report.config, plan)[0] * SEQ * BATCH * 4
    assert kept * 0.97 <= estimate - one_layer <= kept * 1.03


def test_mixed_precision_adds_float32_master_weights(small_llama):
    report = memory_report(ModelSource("hf", small_llama))
    bf16 = training_memory(report.config, report.num_parameters, TrainingPlan("full", dtype="bfloat16"))
    assert bf16.weights == 2 * report.num_parameters and bf16.master_weights == 4 * report.num_parameters
    assert bf16.optimizer_states == 8 * report.num_parameters


def test_cli(small_llama, capsys):
    assert main(["memory", str(small_llama), "--train", "lora", "--lora-rank", "8", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "with LoRA (rank 8" in out and "activations" in out and "total" in out
    assert main(["memory", str(small_llama), "--train", "full", "--batch", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
