"""OpenAI's routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

from fastapi import APIRouter, Request

from ...pooling_params import PoolingParams
from .errors import APIError
from .protocol import COMPLETIONS_MAX_TOKENS, ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from .responses import Echo, completion_response, embedding_response
from .serving import OpenAIServer, final_output, unless_gone
from .streams import completion_stream, sse, then_probes


def openai_routes(server: OpenAIServer, auth: list) -> APIRouter:
    router, config, client = APIRouter(), server.config, server.client

    @router.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        created = int(time.time())
        card = {"id": config.served_model_name, "object": "model", "created": created, "owned_by": "pagedllm",
                "max_model_len": client.info.max_model_len}
        return {"object": "list", "data": [card] + [
            {**card, "id": name, "parent": config.served_model_name, "lora_rank": rank}
            for name, rank in client.adapters.items()]}

    @router.post("/v1/embeddings", dependencies=auth)
    async def embeddings(body: EmbeddingRequest, request: Request) -> dict:
        lora = server.check_model(body.model)
        hidden = client.info.hidden_size
        if body.dimensions is not None and body.dimensions != hidden:
            raise APIError(400, f"dimensions: this model's embeddings have {hidden} dimensions (it was not trained "
                                f"to be truncated)", "dimensions")
        prompts = server.prompts(body.input, "input")
        for p in prompts:
            if len(p.ids) >= client.info.max_model_len:
                raise APIError(400, f"This model's maximum context length is {client.info.max_model_len} tokens; an "
                                    f"input has {len(p.ids)}.", "input", "context_length_exceeded")
        params = PoolingParams(config.pooling)
        request_id = f"embd-{uuid.uuid4().hex}"
        gens = await server.start([f"{request_id}-{i}" for i in range(len(prompts))], prompts,
                                  [params] * len(prompts), lora)
        outputs = await unless_gone(request, asyncio.gather(*(final_output(g) for g in gens)))
        return embedding_response(server.model_name(lora), outputs, body.encoding_format)

    @router.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        lora = server.check_model(body.model)
        server.check_generates()
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 only with echo, to score the prompt)", "max_tokens")
        prompts = server.completion_prompts(body)
        budgets = [server.max_tokens(body.max_tokens, len(p.ids), "max_tokens", "prompt",
                                   default=COMPLETIONS_MAX_TOKENS) for p in prompts]
        # max_tokens 0 (scoring) still runs one step: the prompt's logprobs come with its first token, dropped.
        params = [server.sampling_params(body, max(1, b), body.logprobs) for b in budgets]
        if body.echo and body.logprobs is not None:
            params = [dataclasses.replace(p, prompt_logprobs=body.logprobs) for p in params]
        echo = [Echo(server.prompt_text(p), body.max_tokens == 0) for p in prompts] if body.echo else None
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        # One probe result per prompt, in their order.
        probed = None if body.probes is None else [await server.probe(p.ids, body.probes, lora) for p in prompts]
        gens = await server.start([f"{request_id}-{i}" for i in range(len(prompts))], prompts, params, lora)
        if body.stream:
            chunks = completion_stream(server, body, request_id, created, prompts, gens, echo)
            return sse(chunks if probed is None else then_probes(chunks, probed))
        outputs = await unless_gone(request, asyncio.gather(*(final_output(g) for g in gens)))
        response = completion_response(request_id, created, server.model_name(lora), outputs, body.n, body.logprobs,
                                       server.tokenizer, body.return_token_ids, echo)
        return response if probed is None else {**response, "probes": probed}

    @router.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        result = await server.chat(body, request)
        return sse(result.chunks) if body.stream else result

    return router
