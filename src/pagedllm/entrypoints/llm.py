"""The offline Python API: LLM(model=...).generate(prompts, params)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from ..engine.llm_engine import LLMEngine, Prompt
from ..engine.outputs import RequestOutput
from ..sampling_params import SamplingParams
from ..tokenizer import Tokenizer


class LLM:
    def __init__(self, model: str | None = None, *, device: str = "cpu", dtype: str = "float32",
                 kv_cache_memory: int = CacheConfig.kv_cache_memory_bytes, block_size: int = 16,
                 max_num_batched_tokens: int = 512, max_num_seqs: int = 64, enable_chunked_prefill: bool = True,
                 enable_prefix_caching: bool = True, max_model_len: int | None = None, seed: int = 0,
                 attention_backend: str = "auto", speculative_config: SpeculativeConfig | dict | None = None):
        config = EngineConfig(
            model=model, device=device, dtype=dtype, seed=seed, attention_backend=attention_backend,
            speculative=SpeculativeConfig(**speculative_config) if isinstance(speculative_config, dict)
            else speculative_config,
            cache=CacheConfig(block_size=block_size, kv_cache_memory_bytes=kv_cache_memory,
                              enable_prefix_caching=enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                      enable_chunked_prefill=enable_chunked_prefill, max_model_len=max_model_len))
        self.engine = LLMEngine(config)
        self._next_id = 0

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """One finished output per prompt, in the order given."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} sampling params for {len(prompts)} prompts")
        ids = []
        for prompt, p in zip(prompts, params_list):
            ids.append(str(self._next_id))
            self.engine.add_request(ids[-1], prompt, p)
            self._next_id += 1
        return self._run(ids)

    def chat(self, conversations: list[dict[str, Any]] | list[list[dict[str, Any]]],
             params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        tokenizer = self.get_tokenizer()
        return self.generate([{"prompt_token_ids": tokenizer.encode_chat(c)} for c in conversations], params)

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
        return [finished[i] for i in ids]
