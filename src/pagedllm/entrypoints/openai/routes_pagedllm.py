"""pagedllm's own routes: /v1/engine (the web page's engine panel), /v1/inspect (probes on the serving
model), /tokenize, /detokenize, and vLLM's run-time LoRA /v1/load_lora_adapter and /v1/unload_lora_adapter."""

from __future__ import annotations

from fastapi import APIRouter

from ...errors import PagedLLMError
from ..batch.board import JobBoard
from .errors import APIError
from .protocol import DetokenizeRequest, InspectRequest, LoadLoRARequest, TokenizeRequest, UnloadLoRARequest
from .errors import api_error
from .serving import OpenAIServer


def pagedllm_routes(server: OpenAIServer, auth: list) -> APIRouter:
    router, config, client = APIRouter(), server.config, server.client
    jobs = JobBoard(config.jobs_dir)

    @router.get("/v1/engine", dependencies=auth)
    async def engine_state() -> dict:
        """pagedllm's: the engine at this moment (requests, KV blocks, rates), for the web page's engine panel."""
        try:
            state = await client.call("snapshot")
        except PagedLLMError as exc:
            raise api_error(exc) from None
        return {"object": "engine", "model": config.served_model_name, "max_model_len": client.info.max_model_len,
                "aborted": client.num_aborted, "batch_jobs": jobs.jobs(), **state}

    @router.post("/v1/inspect", dependencies=auth)
    async def inspect(body: InspectRequest) -> dict:
        """Probes on the serving model, without stopping it: the response of `pagedllm inspect --json`."""
        lora = server.check_model(body.model)
        prompt = await server.one_prompt(body.prompt, body.messages)
        if len(prompt.ids) > client.info.max_model_len:
            raise APIError(400, f"This model's maximum context length is {client.info.max_model_len} tokens; the prompt "
                                f"has {len(prompt.ids)}.", "prompt", "context_length_exceeded")
        return {"object": "inspection", "model": server.model_name(lora), "num_layers": client.info.num_layers,
                "num_heads": client.info.num_heads, **await server.probe(prompt.ids, body, lora)}

    @router.post("/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeRequest) -> dict:
        server.check_model(body.model)
        ids = (await server.one_prompt(body.prompt, body.messages, body.add_special_tokens)).ids
        return {"tokens": ids, "count": len(ids), "max_model_len": client.info.max_model_len}

    @router.post("/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeRequest) -> dict:
        server.check_model(body.model)
        vocab = client.info.vocab_size
        if any(t < 0 or t >= vocab for t in body.tokens):
            raise APIError(400, f"tokens must be in [0, {vocab})", "tokens")
        return {"prompt": server.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @router.post("/v1/load_lora_adapter", dependencies=auth)
    async def load_lora_adapter(body: LoadLoRARequest) -> dict:
        """vLLM's: load an adapter from this machine's files, under a name requests then give as `model`."""
        server.check_lora_updates()
        if body.lora_name == config.served_model_name:
            raise APIError(400, "lora_name must differ from the served model's name", "lora_name")
        try:
            rank = await client.call("load_lora", body.lora_name, server.lora_path(body.lora_path))
        except PagedLLMError as exc:
            raise APIError(400, str(exc), "lora_path") from None
        return {"object": "lora_adapter", "id": body.lora_name, "status": "loaded", "lora_rank": rank}

    @router.post("/v1/unload_lora_adapter", dependencies=auth)
    async def unload_lora_adapter(body: UnloadLoRARequest) -> dict:
        server.check_lora_updates()
        if body.lora_name not in client.adapters:
            raise APIError(404, f"no LoRA adapter named {body.lora_name!r} is loaded", "lora_name", "model_not_found")
        try:
            await client.call("unload_lora", body.lora_name)
        except PagedLLMError as exc:
            raise APIError(409, str(exc), "lora_name") from None
        return {"object": "lora_adapter", "id": body.lora_name, "status": "unloaded"}

    return router
