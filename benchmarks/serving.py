"""Serving benchmark: `pagedllm serve` under Poisson arrivals at several request rates.

    .venv/bin/python benchmarks/serving.py [--num-requests 32] [--rates 0.5,1,2,inf] [--max-tokens 64]

Starts the server on the default model (start-up time = command to the first /health 200), then
for each rate sends the same seeded chat workload with exponential inter-arrival gaps (inf: all
at once), streaming, and reports TTFT, TPOT and end-to-end latency percentiles and output tokens/s.
One JSON line per rate. No serving peer runs in the same run: llama.cpp's server
(llama-cpp-python) is not installed here and transformers has no server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

TOPICS = ["the history of Rome", "how a bicycle works", "why the sky is blue", "the water cycle", "volcanoes",
          "how bread rises", "the rules of chess", "photosynthesis", "the moon landing", "how vaccines work"]


def workload(n: int, max_tokens: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"model": "bench", "messages": [{"role": "user", "content": f"Explain {rng.choice(TOPICS)} "
                                             f"{'in detail' if rng.random() < 0.5 else 'briefly'}."}],
             "max_tokens": rng.randint(max_tokens // 2, max_tokens), "temperature": 0, "stream": True,
             "stream_options": {"include_usage": True}} for _ in range(n)]


def start_server(port: int) -> tuple[subprocess.Popen, float]:
    exe = Path(sys.executable).with_name("pagedllm")
    started = time.perf_counter()
    process = subprocess.Popen([str(exe), "serve", "--port", str(port), "--served-model-name", "bench",
                                "--kv-cache-memory", "512MiB"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise SystemExit("the server exited during start-up")
        time.sleep(0.05)


async def one(http: httpx.AsyncClient, body: dict, delay: float) -> dict:
    await asyncio.sleep(delay)
    sent = time.perf_counter()
    token_times, tokens = [], 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["delta"].get("content"):
                token_times.append(time.perf_counter())
    done = time.perf_counter()
    ttft = token_times[0] - sent if token_times else done - sent
    tpot = (token_times[-1] - token_times[0]) / (tokens - 1) if tokens > 1 and token_times else 0.0
    return {"ttft": ttft, "tpot": tpot, "latency": done - sent, "tokens": tokens}


def percentiles(values: list[float]) -> dict:
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


async def run_rate(url: str, bodies: list[dict], rate: float, seed: int) -> dict:
    rng, at, delays = random.Random(seed), 0.0, []
    for _ in bodies:
        delays.append(at)
        at += rng.expovariate(rate) if rate != float("inf") else 0.0
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=256)) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(http, b, d) for b, d in zip(bodies, delays)))
        elapsed = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {"rate_req_s": rate if rate != float("inf") else "inf", "num_requests": len(bodies), "elapsed_s": elapsed, "output_tokens": tokens,
            "output_tok_s": tokens / elapsed, "requests_s": len(bodies) / elapsed,
            "ttft_s": percentiles([r["ttft"] for r in results]), "tpot_s": percentiles([r["tpot"] for r in results]),
            "latency_s": percentiles([r["latency"] for r in results])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--rates", default="0.5,1,2,inf", help="request rates (req/s), comma-separated")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process, startup = start_server(port)
    print(json.dumps({"benchmark": "serving", "startup_s": startup}), flush=True)
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(run_rate(url, workload(2, 8, args.seed + 1), float("inf"), 0))  # warm-up (kernel build)
        for rate in (float(r) for r in args.rates.split(",")):
            report = asyncio.run(run_rate(url, workload(args.num_requests, args.max_tokens, args.seed), rate, args.seed))
            print(json.dumps(report), flush=True)
    finally:
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    main()
