"""The engine core in its own process: only deltas cross the boundary, and a core that dies never hangs a
client — every open request fails at once and a fresh core serves the next one."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time

import httpx
import msgspec
import pytest

from live_server import LiveServer
from pagedllm import SamplingParams
from pagedllm.config import CacheConfig, EngineConfig
from pagedllm.engine.core_client import AsyncEngineClient, EngineDeadError
from pagedllm.entrypoints import create_engine_client

LONG = 240  # tokens in the long stream (the tiny model's context is 256)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_models):
    return str(tiny_models["llama"].gguf_path)


def test_only_deltas_cross_the_process_boundary(tiny_gguf):
    """Each token crosses once: what the core sends per step does not grow with the stream (a cumulative
    output would send ~LONG²/2 token ids and its messages would grow to LONG ids)."""
    async def run():
        client = create_engine_client(EngineConfig(model=tiny_gguf, cache=CacheConfig(kv_cache_memory_bytes=2**24)))
        received = []
        deliver = client._deliver
        client._deliver = lambda core, deltas: (received.extend(deltas), deliver(core, deltas))
        await client.start()
        try:
            params = SamplingParams(max_tokens=LONG, temperature=0, ignore_eos=True, logprobs=1)
            async for output in client.generate("r", [1, 2, 3, 4], params):
                pass
        finally:
            await client.shutdown()
        return received, output

    received, output = asyncio.run(run())
    ids = [t for delta in received for s in delta.sequences for t in s.token_ids]
    assert ids == output.token_ids and len(ids) == LONG
    assert sum(len(s.logprobs) for delta in received for s in delta.sequences) == LONG == len(output.outputs[0].logprobs)
    assert output.text and "text" not in msgspec.structs.asdict(received[0].sequences[0])  # text is made client-side
    sizes = [len(msgspec.msgpack.encode(delta)) for delta in received]
    assert max(sizes[-50:]) <= max(sizes[1:51]) + 16  # the last steps' messages are no larger than the first's


def test_a_stop_string_found_by_the_client_stops_the_core(tiny_gguf):
    """The client finds stop strings in the text it makes; the core is told at once and stops computing."""
    async def run():
        client = create_engine_client(EngineConfig(model=tiny_gguf, cache=CacheConfig(kv_cache_memory_bytes=2**24)))
        await client.start()
        try:
            greedy = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, skip_special_tokens=False)
            async for plain in client.generate("plain", [1, 2, 3, 4], greedy):
                pass
            stop = plain.text[len(plain.text) // 3:len(plain.text) // 3 + 3]
            before = client.stats.generation_tokens_total
            async for output in client.generate("stopped", [1, 2, 3, 4], dataclasses.replace(greedy, stop=(stop,))):
                pass
            deadline = time.monotonic() + 5
            while (client.stats.num_running or client.stats.generation_tokens_total == before) \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return plain, stop, output, client.stats.generation_tokens_total - before, client.stats.num_running
        finally:
            await client.shutdown()

    plain, stop, output, generated, running = asyncio.run(run())
    assert output.text == plain.text[:plain.text.index(stop)] and output.outputs[0].stop_reason == stop
    assert output.finished and running == 0
    assert len(output.token_ids) <= generated <= len(output.token_ids) + 4 < len(plain.token_ids)


def _wait_health(url: str, status: int, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if httpx.get(f"{url}/health").status_code == status:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"/health did not answer {status} within {timeout} s")


def test_killed_core_fails_open_requests_at_once_and_a_fresh_core_serves():
    """The default model (a stream of 400 tokens takes seconds: the kill lands mid-stream)."""
    with LiveServer(served_model_name="tiny", max_model_len=512) as server:
        body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))  # tokens are flowing
            os.kill(server.client.cores[0].process.process.pid, signal.SIGKILL)
            killed = time.monotonic()
            rest = [line for line in lines if line.startswith("data: ")]
        assert time.monotonic() - killed < 1.0  # the stream ended within a second of the kill ...
        assert "the engine core stopped" in rest[-2] and rest[-1] == "data: [DONE]"  # ... with an error event
        assert httpx.get(f"{server.url}/health").status_code == 503
        _wait_health(server.url, 200, 120)  # a fresh core
        again = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 8, "stream": False}, timeout=30)
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 8
        assert server.client.cores[0].restarts_left == 2


def test_client_call_after_the_last_restart_is_refused_clearly(tiny_gguf):
    async def run():
        client = create_engine_client(EngineConfig(model=tiny_gguf, cache=CacheConfig(kv_cache_memory_bytes=2**24)))
        client.cores[0].restarts_left = 0
        await client.start()
        client.cores[0].process.process.kill()
        for _ in range(100):
            if client.dead is not None:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(EngineDeadError, match="not restarted"):
            await client.add("r", [1, 2], SamplingParams(max_tokens=2))
        await client.shutdown()

    asyncio.run(run())


def test_data_parallel_routes_a_shared_prefix_to_the_core_that_has_it(tiny_gguf):
    """Two cores: a prompt goes to the idle one, an unrelated one beside it to the other; a prompt sharing
    the first one's beginning goes back to its core, whose prefix cache then hits (the other's does not)."""
    async def run():
        config = EngineConfig(model=tiny_gguf, cache=CacheConfig(kv_cache_memory_bytes=2**24))
        client = AsyncEngineClient(config, data_parallel_size=2)
        await client.start()
        params = SamplingParams(max_tokens=4, temperature=0)
        shared = list(range(10, 74))  # four whole blocks of 16
        try:
            first = await client.add("a", shared + [1], params)  # both idle: core 0
            other = await client.add("b", list(range(100, 164)), params)  # core 0 busy: core 1
            assert [client._where[i].index for i in ("a", "b")] == [0, 1]
            for outputs in (first, other):
                async for _ in outputs:
                    pass
            again = await client.add("c", shared + [2, 3], params)
            routed = client._where["c"].index
            async for _ in again:
                pass
            await asyncio.sleep(0.3)  # the cores' stats follow their last steps
            hits = [core.stats.prefix_cache_hit_rate for core in client.cores]
            cpus = [core.cpus for core in client.cores]
        finally:
            await client.shutdown()
        return routed, hits, cpus

    routed, hits, cpus = asyncio.run(run())
    assert routed == 0
    assert hits[0] > 0 and hits[1] == 0
    assert len(os.sched_getaffinity(0)) < 2 or (cpus[0] and cpus[1] and not set(cpus[0]) & set(cpus[1]))


def test_values_the_wire_cannot_carry_are_refused_and_the_server_keeps_serving(tiny_gguf):
    """msgpack carries 64-bit integers: a body's larger ones (which pydantic lets through as Python ints) must be a
    400 naming the problem, not a 500, and the core must stay up."""
    with LiveServer(tiny_gguf, served_model_name="tiny", max_model_len=256) as server:
        huge = {"model": "tiny", "prompt": "hi", "layers": [-(2**63) - 1]}
        probed = httpx.post(f"{server.url}/v1/inspect", json=huge, timeout=30)
        assert probed.status_code == 400 and "Traceback" not in probed.text
        sampled = httpx.post(f"{server.url}/v1/completions", timeout=30,
                             json={"model": "tiny", "prompt": "hi", "max_tokens": 2, "seed": 2**64})
        assert 400 <= sampled.status_code < 500 and "error" in sampled.json()
        fine = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                          timeout=30)
        assert fine.status_code == 200 and httpx.get(f"{server.url}/health").status_code == 200
