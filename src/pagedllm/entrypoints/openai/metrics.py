"""Prometheus metrics, named after vLLM's (`pagedllm:` instead of `vllm:`), in a registry per server."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ...engine.outputs import EngineStats, RequestOutput

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class _EngineCollector:
    """Gauges and counters read from the engine's latest stats at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        yield GaugeMetricFamily("pagedllm:num_requests_running", "Requests in the running set.", value=s.num_running)
        yield GaugeMetricFamily("pagedllm:num_requests_waiting", "Requests waiting to be scheduled.",
                                value=s.num_waiting)
        yield GaugeMetricFamily("pagedllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
                                value=s.kv_usage)
        yield GaugeMetricFamily("pagedllm:prefix_cache_hit_rate", "Prompt tokens found in the prefix cache "
                                "over prompt tokens looked up.", value=s.prefix_cache_hit_rate)
        yield CounterMetricFamily("pagedllm:num_preemptions", "Requests preempted.", value=s.num_preemptions)
        yield CounterMetricFamily("pagedllm:prompt_tokens", "Prompt tokens computed.", value=s.prompt_tokens_total)
        yield CounterMetricFamily("pagedllm:generation_tokens", "Tokens generated.", value=s.generation_tokens_total)


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        self.ttft = Histogram("pagedllm:time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("pagedllm:time_per_output_token_seconds", "Mean time between output tokens "
                              "of a request.", buckets=_LATENCY_BUCKETS, registry=self.registry)

    def observe_finished(self, output: RequestOutput) -> None:
        m = output.metrics
        if m is None or m.first_token_time is None:
            return
        self.ttft.observe(m.first_token_time - m.arrival_time)
        tokens = max(len(c.token_ids) for c in output.outputs) if output.outputs else 0
        if tokens > 1 and m.finish_time is not None:
            self.tpot.observe((m.finish_time - m.first_token_time) / (tokens - 1))
