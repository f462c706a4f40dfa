"""The CLI as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pagedllm.entrypoints.cli import main, parse_bytes


def _run(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagedllm.entrypoints.cli", *argv], capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_generate_streams_greedy_text():
    result = _run("generate", "The capital of France is", "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_chat_session_answers_each_line():
    # "What is the capital of France?" starts "The" or "L'Étoile" by 0.08 of a logit even in float32:
    # a near-tie that bf16 rounding in the prefill decides. This one keeps a margin of 0.8 or more up to "Paris".
    result = _run("chat", "--max-tokens", "24", stdin="Name the capital city of France.\nAnd of Italy?\n/exit\n")
    assert result.returncode == 0, result.stderr
    header, first, second, _ = result.stdout.split("> ")
    assert "Paris" in first and second.strip()


def test_chat_sends_the_whole_history(monkeypatch):
    from pagedllm.entrypoints.cli import generate as cli
    from pagedllm.sampling_params import SamplingParams

    llm_prompts = []

    class Tokenizer:
        def encode_chat(self, messages):
            llm_prompts.append([dict(m) for m in messages])
            return [1, 2, 3]

    class Engine:
        tokenizer = Tokenizer()

    monkeypatch.setattr(cli, "stream", lambda engine, rid, prompt, params: f"answer {len(llm_prompts)}")
    history = [{"role": "system", "content": "be brief"}]
    cli._chat_turn(Engine(), history, "first", SamplingParams(), 0)
    cli._chat_turn(Engine(), history, "second", SamplingParams(), 1)
    assert [m["content"] for m in llm_prompts[1]] == ["be brief", "first", "answer 1", "second"]


def test_memory_reports_the_default_model(capsys):
    assert main(["memory", "--budget", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "134,515,008" in out  # SmolLM2-135M's parameters
    assert "float32 45.00 KiB" in out  # 2 · 30 layers · 3 kv heads · 64 dims · 4 bytes
    assert f"float32 {2**30 // 46080:,}" in out


def test_memory_of_a_huggingface_folder(tiny_models, capsys):
    assert main(["memory", str(tiny_models["qwen2"].hf_dir)]) == 0
    assert "qwen2: 2 layers" in capsys.readouterr().out


@pytest.mark.parametrize("text,value", [("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20), ("2G", 2 * 2**30),
                                        ("1000", 1000), ("1.5KiB", 1536)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_bad_flag_value_is_one_line():
    result = _run("generate", "hi", "--kv-cache-memory", "lots")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "is not a size" in result.stderr
