"""Training rows: which tokens are answers, the refusals of bad rows, the step plan; the command's
front door (--plot, errors, resume checks, bf16, TensorBoard)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pagedllm.errors import PagedLLMError
from pagedllm.training import TrainConfig, Trainer
from pagedllm.training.data import BatchPlan, DataError, encode_row, read_dataset
from pagedllm.training.trainer import prepare_run


@pytest.fixture(scope="module")
def tokenizer():
    from pagedllm.models.loaders import resolve_model
    from pagedllm.tokenizer.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model(None))


def answer_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, a in zip(example.ids, example.answer) if a], skip_special_tokens=False)


def test_chat_rows_learn_every_assistant_turn_and_nothing_else(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."}]
    example = encode_row({"messages": messages, "channel": "chat"}, tokenizer)
    assert example.ids == tokenizer.encode_chat(messages, add_generation_prompt=False)
    assert answer_text(tokenizer, example) == "Hello.<|im_end|>\nGoodbye.<|im_end|>\n"
    assert example.channel == "chat"


def test_prompt_completion_rows_learn_the_completion_and_its_end(tokenizer):
    example = encode_row({"prompt": "Two and two make", "completion": " four"}, tokenizer)
    assert answer_text(tokenizer, example) == " four" + tokenizer.decode([tokenizer.eos_token_id],
                                                                          skip_special_tokens=False)
    assert example.ids[:len(example.ids) - 2] == tokenizer.encode("Two and two make")
    assert example.channel == "default"


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not JSON"),
    ("[1, 2]", "JSON object"),
    ('{"text": "hi"}', "needs 'messages'"),
    ('{"prompt": "a", "completion": ""}', "completion not empty"),
    ('{"prompt": 1, "completion": "b"}', "must be strings"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', "starts with a system or user"),
    ('{"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}', "role"),
    ('{"prompt": "a", "completion": "b", "channel": 3}', "'channel'"),
])
def test_bad_rows_are_refused_with_their_line(tokenizer, tmp_path, line, problem):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"data.jsonl:3: .*{problem}"):
        read_dataset(path, tokenizer, 64)


def test_rows_cut_to_no_answer_are_dropped_and_counted(tokenizer, tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": "word " * 40, "completion": " end"}, {"prompt": "short", "completion": " end"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    dataset = read_dataset(path, tokenizer, 16)
    assert (len(dataset.examples), dataset.truncated, dataset.dropped) == (1, 1, 1)
    path.write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="no row with an answer.*1 were cut"):
        read_dataset(path, tokenizer, 16)


def test_every_row_is_seen_once_an_epoch_split_over_ranks():
    plan = BatchPlan(num_rows=10, global_batch=4, seed=3)
    assert plan.steps_per_epoch == 3
    epoch = [r for step in range(3) for r in plan.step_rows(step)]
    assert sorted(epoch) == list(range(10))
    assert [r for step in range(3, 6) for r in plan.step_rows(step)] != epoch  # each epoch its own order
    rows = plan.step_rows(0)
    ranks = [plan.rank_rows(rows, rank, 2) for rank in range(2)]
    assert sorted(ranks[0] + ranks[1]) == sorted(rows)
    assert plan.micro_batches([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pagedllm.entrypoints.cli", "train", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def _rows(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": f"Item {i} is", "completion": " blue", "channel": "colour" if i % 2 else "other"}
            for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_cli_errors_are_one_clear_line(tmp_path):
    missing = _cli("--out", tmp_path / "run")
    assert missing.returncode == 2 and "needs --data" in missing.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n", encoding="utf-8")
    refused = _cli("--data", bad, "--out", tmp_path / "run")
    assert refused.returncode == 2 and "bad.jsonl:1: not JSON" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "run" / "run.json").exists()  # a refused file does not claim the run folder
    assert _cli("--plot", tmp_path / "nowhere").returncode == 2
    flags = _cli("--data", bad, "--out", tmp_path / "run2", "--batch-size", "0")
    assert flags.returncode == 2 and "--batch-size" in flags.stderr


def test_resume_must_match_the_run(tmp_path):
    data = _rows(tmp_path)
    first = TrainConfig(str(data), str(tmp_path / "run"), max_steps=2)
    prepare_run(first)
    with pytest.raises(PagedLLMError, match="holds a training run already"):
        prepare_run(first)
    with pytest.raises(PagedLLMError, match="--lora-rank differ"):
        prepare_run(TrainConfig(str(data), str(tmp_path / "run"), max_steps=2, lora_rank=4, resume=True))
    prepare_run(TrainConfig(str(data), str(tmp_path / "run"), max_steps=9, resume=True))  # more steps: fine


def test_bf16_run_tracks_fp32_and_writes_tensorboard_and_plot(tiny_models, tmp_path):
    data = _rows(tmp_path)
    losses = {}
    for precision in ("fp32", "bf16"):
        run = tmp_path / precision
        Trainer(TrainConfig(str(data), str(run), model=str(tiny_models["llama"].hf_dir), max_steps=3,
                            precision=precision, lr=1e-2)).run()
        losses[precision] = [line.split(",")[4] for line in (run / "log.csv").read_text().splitlines()[1:]]
    assert len(losses["fp32"]) == len(losses["bf16"]) >= 3
    for a, b in zip(losses["fp32"], losses["bf16"]):
        assert float(b) == pytest.approx(float(a), rel=0.05)
    assert list((tmp_path / "bf16" / "tensorboard").glob("events.out.tfevents.*"))
    plotted = _cli("--plot", tmp_path / "bf16")
    assert plotted.returncode == 0, plotted.stderr
    png = tmp_path / "bf16" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
