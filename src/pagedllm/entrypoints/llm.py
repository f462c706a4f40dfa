"""The offline Python API: LLM(model=...).generate(prompts, params)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config import build_engine_config
from . import create_engine
from ..engine.llm_engine import Prompt
from ..engine.outputs import RequestOutput
from ..kernels.openmp import kernels_in_this_thread
from ..pooling_params import PoolingParams
from ..sampling_params import SamplingParams
from ..tokenizer import Tokenizer
from ..tools.inspect import AttentionQuery, Comparison, Inspection, compare_layers, inspect_model, load_reference


class LLM:
    def __init__(self, model: str | None = None, **options: Any):
        """`options` are build_engine_config's: device, dtype, kv_cache_memory, block_size, max_num_seqs,
        enable_lora, lora_modules ({name: path}), max_loras, max_lora_rank, ..."""
        config = build_engine_config(model, **options)
        self.engine = create_engine(config)
        self._next_id = 0

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | PoolingParams | Sequence[SamplingParams | PoolingParams] | None = None,
                 lora: str | Sequence[str | None] | None = None) -> list[RequestOutput]:
        """One finished output per prompt, in the order given. `lora`: a loaded adapter's name for every
        prompt, or one name (or None: the base model) per prompt; all of them run in the same batch."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} sampling params for {len(prompts)} prompts")
        loras = [lora] * len(prompts) if lora is None or isinstance(lora, str) else list(lora)
        if len(loras) != len(prompts):
            raise ValueError(f"{len(loras)} LoRA adapters for {len(prompts)} prompts")
        ids = []
        for prompt, p, adapter in zip(prompts, params_list, loras):
            ids.append(str(self._next_id))
            self.engine.add_request(ids[-1], prompt, p, lora=adapter)
            self._next_id += 1
        return self._run(ids)

    def embed(self, prompts: Prompt | Sequence[Prompt], params: PoolingParams | None = None,
              lora: str | Sequence[str | None] | None = None) -> list[RequestOutput]:
        """Each prompt's final hidden states pooled into one vector (`RequestOutput.embedding`, float32): the
        last token's by default, or their mean (`PoolingParams("mean")`); nothing is generated."""
        return self.generate(prompts, params or PoolingParams(), lora)

    def load_lora(self, name: str, path: str) -> None:
        """Load a LoRA adapter (a PEFT folder or a llama.cpp GGUF LoRA) for generate(lora=name); the LLM
        must have been made with enable_lora=True or lora_modules."""
        self.engine.load_lora(name, path)

    def unload_lora(self, name: str) -> None:
        self.engine.unload_lora(name)

    def chat(self, conversations: list[dict[str, Any]] | list[list[dict[str, Any]]],
             params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        tokenizer = self.get_tokenizer()
        return self.generate([{"prompt_token_ids": tokenizer.encode_chat(c)} for c in conversations], params)

    def inspect(self, prompt: str | list[int], layers: list[int] | None = None, top_k: int = 10,
                attention: list[AttentionQuery | str | tuple] | None = None, lora: str | None = None) -> Inspection:
        """Probe the model (through LoRA adapter `lora` where given) layer by layer on `prompt` (see
        tools/inspect.py); `attention`: which weights to read, as AttentionQuery or 'L:H:i:j' strings. The
        engine's cache and requests are untouched."""
        with kernels_in_this_thread(), self.engine.adapted(lora):
            return inspect_model(self.engine.model, self._ids(prompt), layers, top_k, self.engine.kv_spec.block_size,
                                 attention)

    def compare(self, prompt: str | list[int], reference: str = "transformers") -> Comparison:
        """The numerics diff, layer by layer, against `reference`: transformers, float, or another checkpoint."""
        ref = load_reference(self.engine.source, reference, str(self.engine.model.norm.weight.device))
        with kernels_in_this_thread():
            return compare_layers(self.engine.model, ref, self._ids(prompt), self.engine.kv_spec.block_size)

    def _ids(self, prompt: str | list[int]) -> list[int]:
        return self.get_tokenizer().encode(prompt) if isinstance(prompt, str) else list(prompt)

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with kernels_in_this_thread():  # whichever thread calls next runs at full speed (kernels/openmp.py)
            while self.engine.has_unfinished():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
        return [finished[i] for i in ids]
