"""LLMEngine: add requests, call step() until none are left, read RequestOutputs."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from ..config import EngineConfig
from ..errors import PagedLLMError
from ..models.loaders import ModelSource, load_model, resolve_model
from ..sampling.sampler import Sampler, SamplingMetadata
from ..sampling_params import SamplingParams
from ..tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer
from .kv_cache_manager import KVCacheManager, blocks_needed
from .model_runner import ModelRunner, plan_kv_cache
from .outputs import EngineStats, RequestMetrics, RequestOutput
from .request import Request, RequestStatus
from .scheduler import ScheduledRequest, Scheduler

THROUGHPUT_WINDOW_S = 10.0
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Prompt = str | list[int] | dict[str, Any]


class RequestError(PagedLLMError, ValueError):
    """A request the engine refuses at admission (too long, bad ids, duplicate id)."""


@dataclass
class _Tracked:
    request: Request
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    prompt: str | None


class LLMEngine:
    def __init__(self, config: EngineConfig, source: ModelSource | None = None):
        if config.dtype not in _DTYPES:
            raise PagedLLMError(f"dtype must be one of {', '.join(_DTYPES)}, got {config.dtype!r}")
        self.config = config
        self.device = _device(config.device)
        dtype = _DTYPES[config.dtype]
        torch.manual_seed(config.seed)
        self.source = source or resolve_model(config.model)
        self.model = load_model(self.source, self.device, dtype)
        self.tokenizer: Tokenizer = load_tokenizer(self.source)
        model_len = self.model.config.max_position_embeddings
        self.max_model_len = min(config.scheduler.max_model_len or model_len, model_len)
        self.kv_spec = plan_kv_cache(self.model.config, config.cache.block_size, config.cache.kv_cache_memory_bytes, dtype)
        if self.kv_spec.num_blocks < 1:
            raise PagedLLMError(f"kv cache memory {config.cache.kv_cache_memory_bytes} bytes is less than one block "
                                f"({self.kv_spec.bytes_per_block} bytes)")
        self.kv_cache = KVCacheManager(self.kv_spec.num_blocks, self.kv_spec.block_size,
                                       config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache)
        self.runner = ModelRunner(self.model, self.kv_spec, self.device, dtype, config.attention_backend)
        self.sampler = Sampler()
        self._tracked: dict[str, _Tracked] = {}
        self._totals = [0, 0]  # prompt tokens computed, tokens generated
        self._recent: deque[tuple[float, int, int]] = deque()  # (time, prompt tokens, generated) per step

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self._tracked:
            raise RequestError(f"request id {request_id!r} is already in use")
        text, ids = self._prompt_ids(prompt)
        self._check_admissible(ids, params)
        generator = torch.Generator(device=self.device).manual_seed(params.seed) if params.seed is not None else None
        request = Request(request_id, ids, params)
        detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
        self._tracked[request_id] = _Tracked(request, detok, generator, text)
        self.scheduler.add_request(request)

    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            prompt = prompt["prompt_token_ids"]
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return None, list(prompt)
        raise RequestError("a prompt is a string, a list of token ids, or {'prompt_token_ids': [...]}")

    def _check_admissible(self, ids: list[int], params: SamplingParams) -> None:
        vocab = self.model.config.vocab_size
        if not ids:
            raise RequestError("the prompt is empty")
        if any(t < 0 or t >= vocab for t in ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; the model's context is {self.max_model_len}")
        total = min(len(ids) + params.max_tokens, self.max_model_len)
        if blocks_needed(total, self.kv_spec.block_size) > self.kv_spec.num_blocks:
            raise RequestError(f"prompt + max_tokens ({total} tokens) exceed the whole KV cache "
                               f"({self.kv_spec.num_tokens} tokens); raise --kv-cache-memory")

    def abort(self, request_id: str) -> None:
        tracked = self._tracked.pop(request_id, None)
        if tracked is not None and not tracked.request.status.finished:
            self.scheduler.finish(tracked.request, RequestStatus.FINISHED_ABORTED)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward pass over everything scheduled; outputs of requests that advanced."""
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        tables = [self.kv_cache.block_table(s.request) for s in out.scheduled]
        batch = self.runner.prepare(out.scheduled, tables)
        logits = self.runner.execute(batch)
        sampling = [s for s in out.scheduled if s.completes_prompt]
        tokens = self._sample(sampling, logits).tolist() if sampling else []
        self._count(out.scheduled, len(tokens))
        self.scheduler.update_from_output(out.scheduled)
        return [self._advance(s.request, token) for s, token in zip(sampling, tokens)]

    def _count(self, scheduled: list[ScheduledRequest], generated: int) -> None:
        prompt = sum(min(s.num_new_tokens, len(s.request.prompt_token_ids) - s.request.num_computed_tokens)
                     for s in scheduled if s.request.num_computed_tokens < len(s.request.prompt_token_ids))
        now = time.monotonic()
        self._totals[0] += prompt
        self._totals[1] += generated
        self._recent.append((now, prompt, generated))
        while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
            self._recent.popleft()

    def _sample(self, sampling: list[ScheduledRequest], logits: torch.Tensor) -> torch.Tensor:
        tracked = [self._tracked[s.request.request_id] for s in sampling]
        meta = SamplingMetadata.build([t.request.sampling_params for t in tracked], [t.generator for t in tracked],
                                      logits.shape[-1], self.device)
        return self.sampler(logits, meta)

    def _advance(self, request: Request, token: int) -> RequestOutput:
        tracked = self._tracked[request.request_id]
        now = time.monotonic()
        request.output_token_ids.append(token)
        request.first_token_time = request.first_token_time or now
        status = self._stop_status(request, token)
        delta = tracked.detokenizer.add(token)
        if status is not None:
            delta += tracked.detokenizer.flush()
            request.finish_time = now
            self.scheduler.finish(request, status)
            del self._tracked[request.request_id]
        return self._output(tracked, delta)

    def _stop_status(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        if (token in self.tokenizer.stop_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if len(request.output_token_ids) >= params.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _output(self, tracked: _Tracked, delta: str) -> RequestOutput:
        r = tracked.request
        metrics = RequestMetrics(r.arrival_time, r.first_token_time, r.finish_time, r.num_preemptions)
        return RequestOutput(r.request_id, r.prompt_token_ids, tracked.detokenizer.text, list(r.output_token_ids),
                             delta, r.status.finished, r.finish_reason, tracked.prompt, metrics)

    def stats(self) -> EngineStats:
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.kv_cache.num_blocks,
                           self.kv_cache.num_free_blocks, self.scheduler.num_preemptions,
                           self.kv_cache.stats.hit_rate, self._totals[0], self._totals[1],
                           self._recent_rate(1), self._recent_rate(2))

    def _recent_rate(self, column: int) -> float:
        """Tokens per second over the window: the tokens of every step after the first, over the span."""
        if len(self._recent) < 2:
            return 0.0
        span = self._recent[-1][0] - self._recent[0][0]
        return sum(step[column] for step in list(self._recent)[1:]) / span if span > 0 else 0.0


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PagedLLMError("--device cuda was asked for, but no CUDA device is available")
    return device
