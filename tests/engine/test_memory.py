"""A long run does not grow: RSS from request 200 to request 2,000 stays within 5%."""

from __future__ import annotations

import gc
import random

import psutil

from pagedllm import LLM, SamplingParams


def drive(engine, num_requests: int, checkpoints: set[int], in_flight: int, seed: int) -> dict[int, int]:
    """Keep `in_flight` requests running (mixed lengths, shared prefixes, sampling, aborts) until
    `num_requests` are done; RSS in bytes when the count of finished requests reaches each checkpoint."""
    rng, process = random.Random(seed), psutil.Process()
    shared = [rng.randrange(1000, 40000) for _ in range(32)]
    started = finished = 0
    rss: dict[int, int] = {}
    while finished < num_requests:
        while started < num_requests and started - finished < in_flight:
            prompt = (shared if rng.random() < 0.3 else []) + [rng.randrange(1000, 40000) for _ in range(rng.randint(4, 40))]
            params = SamplingParams(max_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 0.8]),
                                    seed=rng.randrange(1000), ignore_eos=True)
            engine.add_request(str(started), {"prompt_token_ids": prompt}, params)
            started += 1
        if rng.random() < 0.02:  # an occasional client gives up
            engine.abort(str(finished + rng.randrange(in_flight)))
        engine.step()
        done = started - len(engine.scheduler.running) - len(engine.scheduler.waiting)
        for mark in sorted(checkpoints - rss.keys()):
            if finished < mark <= done:
                gc.collect()
                rss[mark] = process.memory_info().rss
        finished = done
    return rss


def test_rss_is_flat_from_request_200_to_2000(tiny_models):
    llm = LLM(str(tiny_models["llama"].hf_dir), kv_cache_memory=8 * 2**20, max_num_batched_tokens=256)
    rss = drive(llm.engine, 2000, {200, 2000}, in_flight=24, seed=0)
    assert rss[2000] <= rss[200] * 1.05, f"RSS grew from {rss[200] >> 20} MiB to {rss[2000] >> 20} MiB"
    engine = llm.engine
    assert not engine.has_unfinished() and not engine._requests and not engine._live and not engine._stopped
    assert not engine._processor._requests
    assert engine.stats().kv_blocks_free == engine.kv_spec.num_blocks
