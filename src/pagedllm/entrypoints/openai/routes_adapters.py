"""OpenAI's Responses API (/v1/responses) and Anthropic's Messages API (/v1/messages): adapters over chat."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .errors import anthropic_error_body
from .messages_api import MessageBuilder, MessagesRequest
from .responses_api import ResponseBuilder, ResponsesRequest
from .serving import OpenAIServer
from .streams import event_stream


def adapter_routes(server: OpenAIServer, auth: list) -> APIRouter:
    router, config = APIRouter(), server.config

    @router.post("/v1/responses", dependencies=auth)
    async def responses(body: ResponsesRequest, request: Request):
        result = await server.chat(body.as_chat(), request)
        builder = ResponseBuilder(body, config.served_model_name)
        if not body.stream:
            return builder.whole(result)
        return event_stream(builder.events(result.chunks), lambda e: {
            "type": "error", "code": e.code or str(e.status), "message": e.message, "param": e.param})

    @router.post("/v1/messages", dependencies=auth)
    async def messages(body: MessagesRequest, request: Request):
        result = await server.chat(body.as_chat(), request)
        if not body.stream:
            return MessageBuilder(config.served_model_name).whole(result)
        builder = MessageBuilder(config.served_model_name, result.prompt_tokens)
        return event_stream(builder.events(result.chunks), lambda e: anthropic_error_body(e.status, e.message))

    return router
