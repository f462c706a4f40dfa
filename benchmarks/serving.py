"""Serving benchmark: `pagedllm serve` against llama.cpp's `llama-server`, and the same requests offline.

    .venv/bin/python benchmarks/serving.py [--concurrency 1,4,16,64] [--requests-per-client 2]
                                           [--threads 2] [--peer llamacpp|none] [--long-stream 4000]

Each server runs on the default model (same GGUF file, same thread count; llama-server with `-np` =
the largest concurrency and a context of 1,024 tokens a slot). Cases, each server in turn:
- one stream: one chat completion of 256 tokens, streamed; its decode rate (tokens after the first
  over the time after the first);
- a realistic workload at each concurrency C: C clients, each sending its next streamed chat
  completion when the last one ends (prompts of 100-1,600 characters, 16-160 tokens, seeded, greedy,
  `ignore_eos` so both engines produce the same counts); output tok/s, TTFT and TPOT percentiles;
- (pagedllm only, `--long-stream N`) one stream of N tokens: the time of its first and last 100 tokens.
Then the same requests through `LLM.generate` in a fresh process (all at once, and the one stream),
and the ratios. The physical limit printed beside: the weights' bytes over the machine's measured
read bandwidth, i.e. the one-stream decode rate no engine can pass.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from llamacpp_peer import cpu_model  # noqa: E402

TOPICS = ["the history of Rome", "how a bicycle works", "why the sky is blue", "the water cycle", "volcanoes",
          "how bread rises", "the rules of chess", "photosynthesis", "the moon landing", "how vaccines work"]
FILLER = ("Please keep the answer focused and concrete, with an example where it helps. I am preparing notes "
          "for a class and want to get the details right. ")
ONE_STREAM_TOKENS = 256


def workload(n: int, seed: int) -> list[dict]:
    """n chat requests: prompts of 100-1,600 characters, 16-160 output tokens."""
    rng = random.Random(seed)
    bodies = []
    for _ in range(n):
        text = f"Explain {rng.choice(TOPICS)}. " + FILLER * 20
        bodies.append(chat_body(text[:rng.randint(100, 1600)], rng.randint(16, 160)))
    return bodies


def chat_body(content: str, max_tokens: int) -> dict:
    return {"model": "bench", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def pagedllm_command(port: int, threads: int, parallel: int) -> list[str]:
    exe = Path(sys.executable).with_name("pagedllm")  # torch takes its thread count from OMP_NUM_THREADS
    return ["env", f"OMP_NUM_THREADS={threads}", str(exe), "serve", "--port", str(port), "--served-model-name", "bench",
            "--kv-cache-memory", "512MiB", "--max-tokens-limit", "8192"]


def llamacpp_command(port: int, threads: int, parallel: int) -> list[str]:
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


async def one(http: httpx.AsyncClient, body: dict) -> dict:
    """One streamed chat completion: when each content delta arrived, and the token count."""
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
    return {"ttft": ttft, "tpot": tpot, "latency": done - sent, "tokens": tokens, "times": token_times}


def percentiles(values: list[float]) -> dict:
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


async def run_concurrency(url: str, bodies: list[dict], clients: int) -> dict:
    """`clients` closed-loop clients share `bodies` in order: each sends the next when its last ends."""
    queue = list(reversed(bodies))
    results = []

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            results.append(await one(http, queue.pop()))

    # A connection per request: llama-server closes idle keep-alive connections, which a pool would reuse.
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": clients, "num_requests": len(bodies), "elapsed_s": elapsed, "output_tokens": tokens,
            "output_tok_s": tokens / elapsed, "ttft_s": percentiles([r["ttft"] for r in results]),
            "tpot_s": percentiles([r["tpot"] for r in results])}


async def one_stream(url: str, tokens: int) -> dict:
    body = chat_body("Tell me a long story about a dragon and a lighthouse.", tokens)
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        result = await one(http, body)
    times = result["times"]
    report = {"tokens": result["tokens"], "ttft_s": result["ttft"],
              "decode_tok_s": (len(times) - 1) / (times[-1] - times[0])}
    if len(times) >= 300:  # a long stream: does a token late in it cost more than an early one?
        report["first_100_s"], report["last_100_s"] = times[100] - times[0], times[-1] - times[-101]
    return report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(server: str, command_for, args: argparse.Namespace, levels: list[int]) -> dict:
    """Start one server, run every case against it, stop it."""
    port = free_port()
    process, startup = start_server(command_for(port, args.threads, max(levels)), port)
    url = f"http://127.0.0.1:{port}"
    report = {"benchmark": "serving", "server": server, "startup_s": startup, "levels": []}
    try:
        asyncio.run(run_concurrency(url, workload(2, args.seed + 1), 2))  # warm-up
        report["one_stream"] = asyncio.run(one_stream(url, ONE_STREAM_TOKENS))
        for clients in levels:
            bodies = workload(clients * args.requests_per_client, args.seed)
            report["levels"].append(asyncio.run(run_concurrency(url, bodies, clients)))
        if args.long_stream and server == "pagedllm":
            report["long_stream"] = asyncio.run(one_stream(url, args.long_stream))
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(json.dumps(report), flush=True)
    return report


_OFFLINE = """
import json, time
import torch
torch.set_num_threads(THREADS)
from pagedllm import LLM, SamplingParams
llm = LLM(kv_cache_memory=512 * 2**20)
tok = llm.get_tokenizer()
def ids(body): return {"prompt_token_ids": tok.encode_chat(body["messages"])}
def params(body): return SamplingParams(max_tokens=body["max_tokens"], temperature=0, ignore_eos=True)
def timed(bodies):
    start = time.perf_counter()
    outs = llm.generate([ids(b) for b in bodies], [params(b) for b in bodies])
    return time.perf_counter() - start, sum(len(o.token_ids) for o in outs)
timed(WARMUP)
one = ONE
first, _ = timed([dict(one, max_tokens=1)])
whole, _ = timed([one])
result = {"one_stream_decode_tok_s": (one["max_tokens"] - 1) / (whole - first), "levels": []}
for clients, bodies in LEVELS:
    elapsed, tokens = timed(bodies)
    result["levels"].append({"concurrency": clients, "output_tok_s": tokens / elapsed})
if LONG:  # the same long stream, step by step: how much later tokens cost here (attention over more keys)
    engine = llm.engine
    engine.add_request("long", ids(one), SamplingParams(max_tokens=LONG, temperature=0, ignore_eos=True))
    times = []
    while engine.has_unfinished():
        engine.step()
        times.append(time.perf_counter())
    result["long_stream"] = {"first_100_s": times[101] - times[1], "last_100_s": times[-1] - times[-101]}
print("RESULT " + json.dumps(result))
"""


def offline(args: argparse.Namespace, levels: list[int]) -> dict:
    """The same requests through LLM.generate in a fresh process: all of a level's requests at once."""
    one = chat_body("Tell me a long story about a dragon and a lighthouse.", ONE_STREAM_TOKENS)
    script = (_OFFLINE.replace("THREADS", str(args.threads)).replace("WARMUP", repr(workload(2, args.seed + 1)))
              .replace("LONG", str(args.long_stream))
              .replace("ONE", repr(one))
              .replace("LEVELS", repr([(c, workload(c * args.requests_per_client, args.seed)) for c in levels])))
    out = subprocess.run([sys.executable, "-"], input=textwrap.dedent(script), capture_output=True, text=True,
                         check=True)
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    print(json.dumps({"benchmark": "serving", "server": "LLM.generate (offline)", **result}), flush=True)
    return result


def decode_limit_tok_s() -> dict:
    """The one-stream decode ceiling: the default model's bytes read once a token over this machine's read
    bandwidth (a torch sum over 1 GiB, best of 5)."""
    import torch

    from pagedllm.models.loaders import default_model_path

    data = torch.ones(2**28, dtype=torch.float32)
    best = min(_timed(data.sum) for _ in range(5))
    bandwidth = data.numel() * 4 / best
    weights = default_model_path().stat().st_size
    return {"read_bandwidth_gb_s": bandwidth / 1e9, "weight_bytes": weights, "decode_limit_tok_s": bandwidth / weights}


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", default="1,4,16,64", help="concurrent clients, comma-separated")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peer", choices=["llamacpp", "none"], default="llamacpp")
    parser.add_argument("--long-stream", type=int, default=0, help="also one stream of this many tokens (pagedllm)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    print(json.dumps({"benchmark": "serving", "cpu": cpu_model(), **decode_limit_tok_s()}), flush=True)
    ours = measure("pagedllm", pagedllm_command, args, levels)
    local = offline(args, levels)
    summary = {"one_stream_vs_offline": ours["one_stream"]["decode_tok_s"] / local["one_stream_decode_tok_s"],
               "levels_vs_offline": {m["concurrency"]: m["output_tok_s"] / o["output_tok_s"]
                                     for m, o in zip(ours["levels"], local["levels"])}}
    if "long_stream" in ours and "long_stream" in local:  # growth over a long stream, served and offline
        summary["long_stream_last_vs_first_100"] = {
            where: r["long_stream"]["last_100_s"] / r["long_stream"]["first_100_s"]
            for where, r in (("served", ours), ("offline", local))}
    if args.peer == "llamacpp":
        peer = measure("llama-server", llamacpp_command, args, levels)
        summary["one_stream_vs_llama_server"] = ours["one_stream"]["decode_tok_s"] / peer["one_stream"]["decode_tok_s"]
        summary["levels_vs_llama_server"] = {m["concurrency"]: m["output_tok_s"] / p["output_tok_s"]
                                             for m, p in zip(ours["levels"], peer["levels"])}
        summary["ttft_p50_vs_llama_server"] = {m["concurrency"]: m["ttft_s"]["p50"] / p["ttft_s"]["p50"]
                                               for m, p in zip(ours["levels"], peer["levels"])}
    print(json.dumps({"benchmark": "serving", "ratios": summary}), flush=True)


if __name__ == "__main__":
    main()
