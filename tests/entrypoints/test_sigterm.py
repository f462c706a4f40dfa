"""SIGTERM stops `serve` (even with a stream open) and `infer` (recording where it stopped) within seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from live_server import free_port

STOP_WITHIN_S = 20


def _default_sigterm():
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_serve_stops_on_sigterm_with_a_stream_open(tiny_models):
    port = free_port()
    args = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "--model", str(tiny_models["llama"].gguf_path),
            "--port", str(port), "--kv-cache-memory", "16MiB", "--max-model-len", "4096", "--log-level", "warning"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigterm)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        streaming = threading.Event()

        def stream() -> None:
            body = {"prompt": "river", "max_tokens": 4000, "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as answer:
                    for _ in answer.iter_lines():
                        streaming.set()
            except httpx.HTTPError:
                pass

        threading.Thread(target=stream, daemon=True).start()
        assert streaming.wait(60), "the stream never started"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=STOP_WITHIN_S + 10)
        assert time.monotonic() - started < STOP_WITHIN_S, stderr
        assert "Traceback" not in stderr, stderr
    finally:
        if proc.poll() is None:
            proc.kill()


def test_infer_stops_on_sigterm_and_says_where(tiny_models, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": i, "prompt": f"row {i}", "max_tokens": 64, "ignore_eos": True}) + "\n"
                            for i in range(200)))
    out = tmp_path / "out.jsonl"
    args = [sys.executable, "-m", "pagedllm.entrypoints.cli", "infer", str(tiny_models["llama"].gguf_path),
            "-i", str(data), "-o", str(out), "--rows-in-flight", "2", "--no-progress", "--kv-cache-memory", "16MiB"]
    env = {**os.environ, "PAGEDLLM_JOBS_DIR": str(tmp_path / "board")}
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_default_sigterm)
    while proc.poll() is None and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.05)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=STOP_WITHIN_S + 10)
    assert time.monotonic() - started < STOP_WITHIN_S
    assert proc.returncode == 130 and "run the same command to resume" in stderr, stderr
    assert "Traceback" not in stderr, stderr


def test_chat_stops_on_sigterm_at_the_prompt_and_mid_answer(tiny_models):
    """`chat` waiting for a line, and `chat` streaming an answer: SIGTERM ends it within seconds, no traceback."""
    for message in (None, "tell me a long story"):
        args = [sys.executable, "-m", "pagedllm.entrypoints.cli", "chat", "--model", str(tiny_models["llama"].gguf_path),
                "--kv-cache-memory", "16MiB", "--max-tokens", "1000", "--min-tokens", "1000"]
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, bufsize=1, preexec_fn=_default_sigterm)
        try:
            ready = proc.stdout.readline()  # the banner: the engine is loaded
            assert "pagedllm chat" in ready, ready + proc.stderr.read()
            if message is not None:
                proc.stdin.write(message + "\n")
                proc.stdin.flush()
                proc.stdout.read(20)  # the answer is streaming
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=STOP_WITHIN_S + 10)
            assert time.monotonic() - started < STOP_WITHIN_S
            assert proc.returncode == 130 and "Traceback" not in stderr, stderr
        finally:
            if proc.poll() is None:
                proc.kill()
