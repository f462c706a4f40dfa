"""`pagedllm train` against transformers: the first step's loss and gradients; data parallel over gloo
logs what one process logs; a killed run resumes from its checkpoint; LoRA on the default model learns;
its results load back (PEFT, the engine, a full checkpoint)."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.models.loaders import load_model, resolve_model
from pagedllm.training import TrainConfig, Trainer
from pagedllm.training.data import padded_batch
from pagedllm.training.lora import checkpoint_order
from pagedllm.training.trainer import answer_losses

from helpers import prefill_logits, step_logits

COLOURS = [{"prompt": f"The colour of item {i} is", "completion": " blue", "channel": "colour"} for i in range(8)]
SUMS = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                      {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}], "channel": "math"}
        for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (6, 3), (7, 2), (4, 4), (8, 1)]]
ROWS = COLOURS + SUMS


def write_rows(folder, rows=ROWS, name="data.jsonl"):
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_csv(run):
    with (run / "log.csv").open(newline="") as f:
        return [(int(r["step"]), r["channel"], float(r["loss"]), int(r["tokens"])) for r in csv.DictReader(f)]


def config(tmp_path, model, **options) -> TrainConfig:
    options = {"batch_size": 4, "max_steps": 1, **options}
    return TrainConfig(str(write_rows(tmp_path)), str(tmp_path / "run"), model=str(model), **options)


def hf_loss_and_grads(hf_model, examples):
    """transformers' loss on the same rows (padded, answer tokens labelled) and its gradients."""
    ids, mask, labels = padded_batch(examples)
    hf_model.zero_grad()
    with torch.enable_grad():
        loss = hf_model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in hf_model.named_parameters() if p.grad is not None}
    hf_model.zero_grad()
    return loss.item(), grads


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "glm", "gemma2", "bloom", "qwen3_moe"])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_first_step_loss_is_transformers_loss(tiny_models, tmp_path, family, mode):
    tiny = tiny_models[family]
    trainer = Trainer(config(tmp_path, tiny.hf_dir, mode=mode, batch_size=16))
    examples = [trainer.dataset.examples[r] for r in trainer.plan.step_rows(0)]
    reference, _ = hf_loss_and_grads(tiny.hf_model, examples)
    trainer.run()
    (logged,) = [loss for step, channel, loss, _ in read_csv(tmp_path / "run") if channel == "all"]
    assert logged == pytest.approx(reference, rel=2e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_first_step_gradients_are_transformers_gradients(tiny_models, tmp_path, family):
    tiny = tiny_models[family]
    trainer = Trainer(config(tmp_path, tiny.hf_dir, mode="full", batch_size=16))
    examples = [trainer.dataset.examples[r] for r in trainer.plan.step_rows(0)]
    _, reference = hf_loss_and_grads(tiny.hf_model, examples)
    losses, _ = answer_losses(trainer.model, examples, trainer.backend, trainer.device)
    (losses.sum() / sum(e.answer_tokens for e in examples)).backward()
    for p in trainer.model.parameters():
        p.data = p.grad  # the model's tensors read back as their gradients, under checkpoint names
    compared = 0
    for name, grad in trainer.model.checkpoint_tensors():
        ours = checkpoint_order(name, grad, trainer.model_config, trainer.family)
        expected = reference[name]
        assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max() + 1e-7, name
        compared += 1
    assert compared == len(reference)


def test_two_gloo_processes_log_what_one_logs(tiny_models, tmp_path):
    data = write_rows(tmp_path)
    model = str(tiny_models["llama"].hf_dir)
    common = [sys.executable, "-m", "pagedllm.entrypoints.cli", "train", model, "--data", str(data), "--max-steps", "3",
              "--lr", "1e-2", "--save-every", "0"]
    one = subprocess.run(common + ["--out", str(tmp_path / "one"), "--batch-size", "4"], capture_output=True, text=True,
                         timeout=300)
    two = subprocess.run(common + ["--out", str(tmp_path / "two"), "--batch-size", "2", "--nproc", "2"],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    single, double = read_csv(tmp_path / "one"), read_csv(tmp_path / "two")
    assert {c for _, c, _, _ in single} == {"colour", "math", "all"}
    assert [(s, c, n) for s, c, _, n in single] == [(s, c, n) for s, c, _, n in double]
    for (_, _, a, _), (_, _, b, _) in zip(single, double):
        assert a == pytest.approx(b, rel=1e-5)
    assert single[-1][2] < single[2][2]  # it trains: the last step's loss is below the first's


def test_killed_run_resumes_from_its_last_checkpoint(tiny_models, tmp_path):
    data = write_rows(tmp_path)
    command = [sys.executable, "-m", "pagedllm.entrypoints.cli", "train", str(tiny_models["llama"].hf_dir), "--data",
               str(data), "--max-steps", "120", "--save-every", "4", "--batch-size", "2", "--lr", "1e-3"]
    whole = subprocess.run(command + ["--out", str(tmp_path / "whole")], capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    run = tmp_path / "killed"
    process = subprocess.Popen(command + ["--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((run / "checkpoints").glob("step-*/state.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    resumed = subprocess.run(command + ["--out", str(run), "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    start = int(resumed.stderr.split("from step ")[1].split()[0])
    assert 0 < start < 120  # killed before the end, resumed from a checkpoint
    expected, got = read_csv(tmp_path / "whole"), read_csv(run)
    assert [(s, c, n) for s, c, _, n in got] == [(s, c, n) for s, c, _, n in expected]  # each step logged once
    for (_, _, a, _), (_, _, b, _) in zip(expected, got):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    again = subprocess.run(command + ["--out", str(run)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr  # a finished run is not overwritten silently


def test_lora_on_the_default_model_lowers_its_channel_losses_and_serves(tmp_path):
    from pagedllm.models.loaders import default_model_path

    run = tmp_path / "run"
    trainer = Trainer(TrainConfig(str(write_rows(tmp_path)), str(run), max_steps=8, lr=1e-3, batch_size=4,
                                  save_every=0))
    trainer.run()
    rows = read_csv(run)
    for channel in ("colour", "math"):
        curve = [loss for _, c, loss, _ in rows if c == channel]
        assert len(curve) >= 4  # a step may hold no row of a channel
        assert curve[-1] < 0.5 * curve[0], (channel, curve)
    llm = LLM(str(default_model_path()), enable_lora=True, lora_modules={"colours": str(run / "adapter")},
              kv_cache_memory=16 * 2**20)
    greedy = SamplingParams(temperature=0, max_tokens=4)
    adapted, base = llm.generate(["The colour of item 42 is"] * 2, greedy, lora=["colours", None])
    assert adapted.outputs[0].text.startswith(" blue")
    assert adapted.outputs[0].finish_reason == "stop"  # it learnt the end of sequence after the completion too
    assert not base.outputs[0].text.startswith(" blue")


def test_saved_adapter_is_peft_adapter_and_engine_adapter(tiny_models, tmp_path):
    from peft import PeftModel

    tiny = tiny_models["llama"]
    trainer = Trainer(config(tmp_path, tiny.hf_dir, max_steps=3, lr=1e-2))
    trainer.run()
    ids = trainer.dataset.examples[0].ids
    with torch.no_grad():
        ours = trainer.model.compute_logits(trainer.model(
            torch.tensor(ids), torch.arange(len(ids)), [None] * len(trainer.model.layers),
            trainer.backend.metadata([len(ids)], "cpu")))
        peft = PeftModel.from_pretrained(tiny.hf_model, str(tmp_path / "run" / "adapter"))
        reference = peft(torch.tensor([ids])).logits[0]
        peft.unload()  # the session's reference model back as it was
        base = tiny.hf_model(torch.tensor([ids])).logits[0]
    assert (reference - base).abs().max() > 0.01
    assert (ours - reference).abs().max() < 1e-4
    llm = LLM(str(tiny.hf_dir), enable_lora=True, lora_modules={"t": str(tmp_path / "run" / "adapter")},
              kv_cache_memory=4 * 2**20, block_size=4)
    (served,) = step_logits(llm, [(ids, "t")])
    assert (served - reference).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["llama", "glm", "phi3", "gemma2"])
def test_full_fine_tune_writes_a_checkpoint_the_engine_loads(tiny_models, tmp_path, family):
    tiny = tiny_models[family]
    trainer = Trainer(config(tmp_path, tiny.hf_dir, mode="full", max_steps=2, lr=1e-2, save_every=0))
    trainer.run()
    written = [p for p in (tmp_path / "run").iterdir() if p.name in ("model", "model.gguf")]
    assert len(written) == 1
    ids = trainer.dataset.examples[0].ids
    with torch.no_grad():
        ours = trainer.model.compute_logits(trainer.model(
            torch.tensor(ids), torch.arange(len(ids)), [None] * len(trainer.model.layers),
            trainer.backend.metadata([len(ids)], "cpu")))
    served = prefill_logits(load_model(resolve_model(written[0]), quantization="none"), ids)
    before = prefill_logits(load_model(resolve_model(tiny.hf_dir)), ids)
    assert (before - served).abs().max() > 0.01  # training moved the model
    assert (served - ours).abs().max() < 1e-4
