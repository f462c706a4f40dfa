"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}; on Anthropic's
/v1/messages in its shape: {"type": "error", "error": {"type", "message"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ...engine.core import QueueFullError
from ...engine.core_client import EngineDeadError
from ...errors import PagedLLMError

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 503: "server_overloaded"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "internal_error" if status >= 500
                                                                else "invalid_request_error"),
                      "param": param, "code": code}}


_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                    413: "request_too_large", 503: "overloaded_error"}
ANTHROPIC_PATH = "/v1/messages"


def anthropic_error_body(status: int, message: str) -> dict:
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_response(error: APIError, request: Request | None = None) -> JSONResponse:
    if request is not None and request.url.path.startswith(ANTHROPIC_PATH):
        return JSONResponse(anthropic_error_body(error.status, error.message), status_code=error.status)
    return JSONResponse(error_body(error.status, error.message, error.param, error.code), status_code=error.status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # its loc is a character position, not a field
            at = first.get("loc", ("body", "?"))[-1]
            return error_response(APIError(400, f"the request body is not valid JSON (at character {at})"), request)
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(where) or (first.get("ctx") or {}).get("field")
        message = f"{param}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid request body")
        return error_response(APIError(400, message, param), request)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail)), request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error while serving a request")
        return error_response(APIError(500, "internal server error; see the server log"), request)


def api_error(exc: BaseException) -> BaseException:
    """The HTTP error for an engine-side one: 503 for a full queue, 500 for a stopped core, 400 for a refusal."""
    if isinstance(exc, QueueFullError):
        return APIError(503, str(exc), code="server_overloaded")
    if isinstance(exc, EngineDeadError):
        return APIError(500, str(exc))
    if isinstance(exc, (PagedLLMError, ValueError)):
        return APIError(400, str(exc), getattr(exc, "param", None))
    return exc
