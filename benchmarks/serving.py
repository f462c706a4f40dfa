"""Serving benchmark: `pagedllm serve` and llama.cpp's `llama-server` under Poisson arrivals.

    .venv/bin/python benchmarks/serving.py [--num-requests 32] [--rates 0.5,1,2,inf] [--max-tokens 64]
                                           [--peer llamacpp|none] [--parallel 16]

Starts each server on the default model in turn (start-up time = command to the first /health
200), then for each rate sends the same seeded chat workload with exponential inter-arrival gaps
(inf: all at once), streaming, and reports TTFT, TPOT and end-to-end latency percentiles and
output tokens/s. One JSON line per server and rate, then one line of ratios per rate. The peer is
llama-server from benchmarks/llamacpp_peer.py (built once for this CPU), with `--parallel` slots
sharing a context of `--parallel` × 1024 tokens and the same thread count.
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


def pagedllm_command(port: int, threads: int, parallel: int) -> list[str]:
    exe = Path(sys.executable).with_name("pagedllm")  # torch takes its thread count from OMP_NUM_THREADS
    return ["env", f"OMP_NUM_THREADS={threads}", str(exe), "serve", "--port", str(port), "--served-model-name", "bench",
            "--kv-cache-memory", "512MiB"]


def llamacpp_command(port: int, threads: int, parallel: int) -> list[str]:
    sys.path.insert(0, str(Path(__file__).parent))
    from llamacpp_peer import ensure_llamacpp
    from pagedllm.models.loaders import default_model_path

    server = ensure_llamacpp() / "llama-server"
    return [str(server), "-m", str(default_model_path()), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-c", str(parallel * 1024)]


def start_server(command: list[str], port: int) -> tuple[subprocess.Popen, float]:
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
            if event.get("choices") and event["choices"][0]["delta"].get("content"):
                token_times.append(time.perf_counter())
    done = time.perf_counter()
    tokens = tokens or len(token_times)  # a server that sends no usage: one token per content delta
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(server: str, command_for, args: argparse.Namespace) -> list[dict]:
    """Start one server, run every rate against it, stop it: one report per rate."""
    port = free_port()
    process, startup = start_server(command_for(port, args.threads, args.parallel), port)
    print(json.dumps({"benchmark": "serving", "server": server, "startup_s": startup}), flush=True)
    reports = []
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(run_rate(url, workload(2, 8, args.seed + 1), float("inf"), 0))  # warm-up (kernel build)
        for rate in (float(r) for r in args.rates.split(",")):
            report = {"server": server, **asyncio.run(run_rate(url, workload(args.num_requests, args.max_tokens,
                                                                              args.seed), rate, args.seed))}
            print(json.dumps(report), flush=True)
            reports.append(report)
    finally:
        process.terminate()
        process.wait(timeout=30)
    return reports


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--rates", default="0.5,1,2,inf", help="request rates (req/s), comma-separated")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peer", choices=["llamacpp", "none"], default="llamacpp")
    parser.add_argument("--parallel", type=int, default=16, help="llama-server's slots (-np)")
    args = parser.parse_args()
    ours = measure("pagedllm", pagedllm_command, args)
    if args.peer == "none":
        return
    peer = measure("llama-server", llamacpp_command, args)
    for mine, theirs in zip(ours, peer):
        print(json.dumps({"rate_req_s": mine["rate_req_s"], "output_tok_s_ratio": mine["output_tok_s"] / theirs["output_tok_s"],
                          "ttft_p50_ratio": mine["ttft_s"]["p50"] / theirs["ttft_s"]["p50"]}), flush=True)


if __name__ == "__main__":
    main()
