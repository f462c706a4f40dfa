"""A live pagedllm server on 127.0.0.1 (uvicorn on a thread of the test process, the engine core in a process of
its own), for the server tests."""

from __future__ import annotations

import functools
import socket
import threading
import time

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from pagedllm.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.entrypoints import create_engine_client
from pagedllm.entrypoints.openai.server import ServerConfig, build_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, model: str | None = None, *, served_model_name: str = "test-model", api_key: str | None = None,
                 kv_cache_memory: int = 128 * 2**20, max_num_seqs: int = 64, max_model_len: int | None = None,
                 block_size: int = 16, quantization: str = "auto", lora: LoRAConfig | None = None, **server_options):
        self.config = ServerConfig(served_model_name, api_key, **server_options)
        self.engine_config = EngineConfig(
            model=model, quantization=quantization, cache=CacheConfig(block_size=block_size, kv_cache_memory_bytes=kv_cache_memory),
            scheduler=SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=max_num_seqs,
                                      max_model_len=max_model_len), lora=lora)
        self.client = create_engine_client(self.engine_config, self.config.max_waiting_requests)
        self.info = self.client.info
        self.app = build_app(self.client, self.config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def tokenizer(self):
        return self.client.tokenizer

    @functools.cached_property
    def reference(self) -> LLMEngine:
        """The same model loaded in the test process, for reference numbers (the server's runs in its core)."""
        return LLMEngine(self.engine_config)

    def idle(self, timeout: float = 10.0) -> bool:
        """Wait until the core reports no request and every KV block free (its stats follow each change)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.client.stats
            if not stats.num_running and not stats.num_waiting and stats.kv_blocks_free == stats.kv_blocks_total:
                return True
            time.sleep(0.05)
        return False

    def metrics_idle(self, timeout: float = 10.0) -> bool:
        """What a user sees: /metrics shows no request running or waiting and the KV pool empty."""
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = httpx.get(f"{self.url}/metrics", headers=headers, timeout=10).text
            gauges = {m.name: m.samples[0].value for m in text_string_to_metric_families(text) if m.samples}
            if gauges["pagedllm:num_requests_running"] == gauges["pagedllm:num_requests_waiting"] == 0 \
                    and gauges["pagedllm:kv_cache_usage_perc"] == 0:
                return True
            time.sleep(0.05)
        return False

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
