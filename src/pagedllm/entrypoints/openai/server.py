"""The OpenAI-compatible HTTP server: FastAPI routes over one AsyncEngineClient (the engine core runs in its own process).

Routes: POST /v1/completions, POST /v1/chat/completions (both stream as server-sent events ending
in `data: [DONE]`), POST /v1/responses (OpenAI's Responses) and POST /v1/messages (Anthropic's
Messages), both adapters over chat that stream named events, POST /v1/embeddings, GET /v1/models,
POST /tokenize, POST /detokenize, GET /health, GET /metrics. Here: the app, its auth, body bound, health,
metrics and web page; each API's routes in their own module (routes_openai, routes_adapters, routes_pagedllm).
"""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ...engine.core_client import AsyncEngineClient
from .errors import APIError, error_body, error_response, install_error_handlers
from .routes_adapters import adapter_routes
from .routes_openai import openai_routes
from .routes_pagedllm import pagedllm_routes
from .serving import OpenAIServer, ServerConfig  # noqa: F401  (ServerConfig: part of this module's API)

UI_DIR = Path(__file__).resolve().parent.parent / "ui"  # the web page: static files, no build step


def build_app(client: AsyncEngineClient, config: ServerConfig, on_ready=None) -> FastAPI:
    server = OpenAIServer(client, config)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await client.start()
        if on_ready is not None:
            on_ready()
        yield
        await client.shutdown()

    # The schema and its pages answer behind the API key like every other route (added below).
    app = FastAPI(title="pagedllm", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.server = server
    install_error_handlers(app)
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)
    auth = [Depends(_auth_dependency(config.api_key))]
    _schema_routes(app, auth)

    @app.get("/health")
    async def health() -> Response:
        if client.dead is not None:
            return error_response(APIError(503, f"{client.dead}; see the server log"))
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if config.ui:
        app.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")

        @app.get("/", include_in_schema=False)
        async def page() -> FileResponse:
            return FileResponse(UI_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    for routes in (openai_routes, adapter_routes, pagedllm_routes):
        app.include_router(routes(server, auth))
    return app


def _schema_routes(app: FastAPI, auth: list) -> None:
    """/openapi.json, /docs and /redoc, each needing the API key when there is one."""
    @app.get("/openapi.json", include_in_schema=False, dependencies=auth)
    async def schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=auth)
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="pagedllm")

    @app.get("/redoc", include_in_schema=False, dependencies=auth)
    async def redoc() -> Response:
        return get_redoc_html(openapi_url="/openapi.json", title="pagedllm")


def _auth_dependency(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        bearer = request.headers.get("authorization", "")
        key = request.headers.get("x-api-key")  # Anthropic's clients send the key this way
        if not (secrets.compare_digest(bearer.encode(), f"Bearer {api_key}".encode())
                or (key is not None and secrets.compare_digest(key.encode(), api_key.encode()))):
            raise APIError(401, "Incorrect or missing API key.", code="invalid_api_key")
    return check


class _BodyLimit:
    """Pure ASGI (a BaseHTTPMiddleware would hide client disconnects from the routes): a POST body is
    refused at once when its Content-Length says more than `limit` bytes, and in any case as soon as
    more than `limit` bytes have arrived (a chunked body has no length, or declares one and sends far
    more). The body is read here, within the bound, and handed on; later receives (a client's
    disconnect) pass straight through."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        refusal = None
        if length.isdigit() and int(length) > self.limit:
            refusal = _refusal(413, f"the request body is larger than {self.limit} bytes")
        else:
            body = await self._read(receive)
            if body is None:
                refusal = _refusal(413, f"the request body is larger than {self.limit} bytes")
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive) -> bytes | None:
        """The whole body, or None as soon as more than `limit` bytes have come."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client left: the route sees an empty body, then the disconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


def _refusal(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status)


def _replay(body: bytes, receive):
    delivered = False

    async def replayed():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replayed
