"""64 concurrent streaming clients with mixed lengths, a quarter of them hanging up mid-stream:
every other request gets the text it gets alone (greedy), and afterwards the KV pool is whole and
/metrics shows nothing running."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import httpx

from helpers import assert_same_or_near_tie
from live_server import LiveServer
from helpers import FLOAT

CLIENTS = 64
SUBJECTS = ["the sea", "a city", "winter", "a robot", "music", "bread", "the moon", "a garden"]


def _request(i: int) -> dict:
    return {"model": "m", "prompt": f"Write about {SUBJECTS[i % 8]} (note {i}):", "max_tokens": 6 + (i * 7) % 30,
            "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True}


async def _stream(http: httpx.AsyncClient, body: dict, hang_up_after: int | None) -> list[int] | None:
    """Token ids streamed for `body`; None if the client hung up after that many events on purpose."""
    ids, events = [], 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events += 1
            ids += json.loads(line[6:])["choices"][0]["token_ids"]
            if hang_up_after is not None and events >= hang_up_after:
                return None  # leaving the block closes the connection mid-stream
    return ids


async def _load(url: str) -> list[list[int] | None]:
    limits = httpx.Limits(max_connections=CLIENTS + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        return await asyncio.gather(*(_stream(http, _request(i), 2 if i % 4 == 0 else None) for i in range(CLIENTS)))


def _alone(url: str, indexes: list[int]) -> dict[int, list[int]]:
    with httpx.Client(base_url=url, timeout=120) as http:
        return {i: http.post("/v1/completions", json={**_request(i), "stream": False}).json()["choices"][0]["token_ids"]
                for i in indexes}


def _metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_64_streaming_clients_with_hang_ups():
    with LiveServer(served_model_name="m", kv_cache_memory=256 * 2**20, quantization=FLOAT) as server:
        finishers = [i for i in range(CLIENTS) if i % 4]
        alone = _alone(server.url, finishers)
        started = time.monotonic()
        results = asyncio.run(_load(server.url))
        assert time.monotonic() - started < 600
        assert all(results[i] is None for i in range(0, CLIENTS, 4))
        prompts = [_request(i)["prompt"] for i in finishers]
        shim = SimpleNamespace(get_tokenizer=lambda: server.tokenizer, engine=server.reference)
        assert_same_or_near_tie(shim, prompts, [alone[i] for i in finishers], [results[i] for i in finishers])
        deadline = time.monotonic() + 10  # aborts of the hung-up requests travel through the engine thread
        while time.monotonic() < deadline:
            metrics = httpx.get(f"{server.url}/metrics").text
            if _metric(metrics, "pagedllm:num_requests_running") == 0 and \
                    _metric(metrics, "pagedllm:kv_cache_usage_perc") == 0:
                break
            time.sleep(0.1)
        assert _metric(metrics, "pagedllm:num_requests_running") == 0
        assert _metric(metrics, "pagedllm:num_requests_waiting") == 0
        assert _metric(metrics, "pagedllm:kv_cache_usage_perc") == 0
        assert server.app.state.server.client.num_aborted == CLIENTS // 4  # hung up before the end
        assert server.idle()
