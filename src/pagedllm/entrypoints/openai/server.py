"""The OpenAI-compatible HTTP server: FastAPI routes over one AsyncEngineClient (the engine core runs in its own process).

Routes: POST /v1/completions, POST /v1/chat/completions (both stream as server-sent events ending
in `data: [DONE]`), POST /v1/responses (OpenAI's Responses) and POST /v1/messages (Anthropic's
Messages), both adapters over chat that stream named events, POST /v1/embeddings, GET /v1/models,
POST /tokenize, POST /detokenize, GET /health, GET /metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ...engine.core import QueueFullError
from ...engine.core_client import AsyncEngineClient, EngineDeadError
from ...engine.outputs import RequestOutput
from ...errors import PagedLLMError
from ...sampling_params import SamplingParams, StructuredOutputParams
from .errors import APIError, anthropic_error_body, error_body, error_response, install_error_handlers
from .messages_api import MessageBuilder, MessagesRequest
from .metrics import ServerMetrics
from ...tools.inspect import ProbeError
from ..batch.board import JobBoard
from .protocol import (COMPLETIONS_MAX_TOKENS, ChatCompletionRequest, ChatMessage, CompletionRequest, DetokenizeRequest,
                       EmbeddingRequest, InspectRequest, LoadLoRARequest, ProbeRequest, SamplingFields, TokenizeRequest,
                       UnloadLoRARequest)
from .reasoning import REASONING_FORMATS, ReasoningSplitter, detect_format
from .responses_api import ResponseBuilder, ResponsesRequest
from .responses import (ChoiceText, Echo, chat_chunk, chat_response, completion_chunk, completion_response,
                        embedding_response, usage)
from .tool_calls import TOOL_FORMATS, detect_tool_format
from .tool_prompt import ToolPlan, template_reads_tools


T = TypeVar("T")
UI_DIR = Path(__file__).resolve().parent.parent / "ui"  # the web page: static files, no build step
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_waiting_requests: int = 256  # beyond this, new requests get 503
    max_body_bytes: int = 2**20
    max_tokens_limit: int = 4096  # the most tokens one request may ask for
    task: str = "generate"  # "embed": an embedding model, served on /v1/embeddings only
    pooling: str = "last"  # how /v1/embeddings reduces a prompt's hidden states: "last" token or "mean"
    reasoning_parser: str = "auto"  # "auto" (from the chat template), "none", or a REASONING_FORMATS name
    tool_call_parser: str = "auto"  # "auto" (from the chat template) or a TOOL_FORMATS name
    ui: bool = True  # the web page at / (entrypoints/ui)
    jobs_dir: str | None = None  # the batch jobs' board (entrypoints/batch/board.py) shown by /v1/engine
    allow_runtime_lora_updates: bool = False  # clients may load adapters from this machine's files


@dataclass(frozen=True)
class ChatStream:
    prompt_tokens: int
    chunks: AsyncIterator[dict]  # chat.completion.chunk bodies


@dataclass
class _Prompt:
    ids: list[int]
    text: str | None


class OpenAIServer:
    def __init__(self, client: AsyncEngineClient, config: ServerConfig):
        self.client, self.config = client, config
        self.tokenizer = client.tokenizer
        self.metrics = ServerMetrics(lambda: self.client.stats)
        client.on_finished = self.metrics.observe_finished
        template = self.tokenizer.chat_template
        self.reasoning = (detect_format(template) if config.reasoning_parser == "auto"
                          else REASONING_FORMATS.get(config.reasoning_parser))
        self.tool_format = (detect_tool_format(template) if config.tool_call_parser == "auto"
                            else TOOL_FORMATS[config.tool_call_parser])
        self.template_reads_tools = template_reads_tools(template)
        # A marker that is a control token (Mistral's [TOOL_CALLS]): decoding must spell it out for the
        # parser, and grammars match it by id.
        self.tool_marker_id = self.tokenizer.special_token_id(self.tool_format.start)

    # -- checks -------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> str | None:
        """The LoRA adapter a request's `model` names (None: the base model); 404 for any other name."""
        if name is None or name == self.config.served_model_name:
            return None
        if name in self.client.adapters:
            return name
        raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    def check_lora_updates(self) -> None:
        if not self.config.allow_runtime_lora_updates or not self.client.info.lora_enabled:
            raise APIError(403, "loading LoRA adapters at run time is off: start the server with --enable-lora "
                                "--allow-runtime-lora-updates", code="lora_updates_disabled")

    def model_name(self, lora: str | None) -> str:
        return lora or self.config.served_model_name

    def check_generates(self) -> None:
        if self.config.task == "embed":
            raise APIError(400, "this server runs an embedding model (--task embed): use /v1/embeddings",
                           code="unsupported_task")

    def max_tokens(self, asked: int | None, prompt_len: int, param: str, prompt_field: str,
                   default: int | None = None) -> int:
        """The token budget of a request; an explicit one that does not fit the context is refused. Without
        one: `default` (OpenAI's 16 for completions; none for chat), within the limit and what the context
        leaves."""
        context = self.client.info.max_model_len
        if asked is None:
            asked = max(1, min(default or context, self.config.max_tokens_limit, context - prompt_len))
        if asked > self.config.max_tokens_limit:
            raise APIError(400, f"{param} must be at most {self.config.max_tokens_limit}, got {asked}", param)
        if prompt_len + asked > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} in the "
                                f"completion). Please reduce the length of the prompt or completion.",
                           prompt_field, "context_length_exceeded")
        return asked

    @staticmethod
    def sampling_params(body: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
        try:
            return body.sampling_params(max_tokens, logprobs)
        except (PagedLLMError, ValueError) as exc:
            message = str(exc)
            raise APIError(400, message, message.split(" ", 1)[0]) from None

    # -- generation ---------------------------------------------------------------------------
    async def start(self, request_ids: list[str], prompts: list[_Prompt], params: list[SamplingParams],
                    lora: str | None = None) -> list[AsyncIterator[RequestOutput]]:
        """Admit every prompt (or none: the ones admitted before a refusal are aborted)."""
        started = []
        try:
            for request_id, prompt, p in zip(request_ids, prompts, params):
                started.append(await self.client.add(request_id, {"prompt_token_ids": prompt.ids}, p, lora))
        except BaseException as exc:
            for request_id in request_ids[:len(started)]:
                self.client.abort(request_id)
            raise _api_error(exc) from None
        return started

    async def probe(self, ids: list[int], probes: ProbeRequest, lora: str | None = None) -> dict:
        """Probes on a prompt (through a LoRA adapter where named), taken in the engine core between two
        steps on a KV cache of their own: the requests being served and their tokens are untouched."""
        try:
            result = await self.client.call("probe", ids, probes.layers, probes.top_k, probes.attention, lora)
        except ProbeError as exc:
            raise APIError(400, str(exc), "probes") from None
        except PagedLLMError as exc:
            raise _api_error(exc) from None
        text = lambda t: self.tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
        result["tokens"] = [text(t) for t in ids]
        result["vocab"] = {str(t): text(t) for layer in result["layers"] for t, _ in layer["top_k"]}  # lens tokens
        return result

    def completion_prompts(self, body: CompletionRequest) -> list[_Prompt]:
        if body.suffix is not None:
            return self.checked([self.fill_in_the_middle(p, body.suffix) for p in _one_or_many(body.prompt)],
                                "prompt")
        return self.prompts(body.prompt, "prompt")

    def prompts(self, given: str | list[str] | list[int] | list[list[int]], param: str) -> list[_Prompt]:
        """One prompt or several, each text or token ids (the `prompt` of completions, embeddings' `input`)."""
        prompts = [_Prompt(self.tokenizer.encode(p), p) if isinstance(p, str) else _Prompt(list(p), None)
                   for p in _one_or_many(given)]
        return self.checked(prompts, param)

    def one_prompt(self, prompt: str | list[int] | None, messages: list[ChatMessage] | None,
                   add_special_tokens: bool = True) -> _Prompt:
        """The prompt of a body that takes exactly one of `prompt` (text or token ids) and chat `messages`."""
        if (prompt is None) == (messages is None):
            raise APIError(400, "give exactly one of prompt and messages", "prompt")
        if messages is not None:
            return self.chat_prompt(messages)
        if isinstance(prompt, str):
            return _Prompt(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens), prompt)
        return self.checked([_Prompt(list(prompt), None)], "prompt")[0]

    def checked(self, prompts: list[_Prompt], param: str) -> list[_Prompt]:
        vocab = self.client.info.vocab_size
        if not prompts or any(not p.ids for p in prompts):
            raise APIError(400, f"{param} must not be empty", param)
        if any(t < 0 or t >= vocab for p in prompts for t in p.ids):
            raise APIError(400, f"{param} token ids must be in [0, {vocab})", param)
        return prompts

    def fill_in_the_middle(self, prefix: str | list[int], suffix: str) -> _Prompt:
        if not isinstance(prefix, str):
            raise APIError(400, "suffix (fill-in-the-middle) needs a text prompt, not token ids", "suffix")
        ids = self.tokenizer.fill_in_the_middle(prefix, suffix)
        if ids is None:
            raise APIError(400, "suffix (fill-in-the-middle) needs a model with FIM tokens; this one has none",
                           "suffix")
        return _Prompt(ids, prefix)

    def prompt_text(self, prompt: _Prompt) -> str:
        return prompt.text if prompt.text is not None else self.tokenizer.decode(prompt.ids, skip_special_tokens=False)

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                    body: ChatCompletionRequest | None = None, tools: ToolPlan | None = None) -> _Prompt:
        """The rendered template (kept as the prompt's text: reasoning splitters look at its end) and its ids."""
        try:
            variables = body.template_variables() if body is not None else {}
        except ValueError as exc:
            raise APIError(400, str(exc), "chat_template_kwargs") from None
        try:
            inputs, tool_variables = (tools or ToolPlan(self.tool_format)).template_input(
                messages, self.template_reads_tools)
            text = self.tokenizer.apply_chat_template(inputs, add_generation_prompt, **variables, **tool_variables)
        except (PagedLLMError, ValueError) as exc:
            raise APIError(400, str(exc), "messages") from None
        return _Prompt(self.tokenizer.encode(text, add_special_tokens=False), text)

    def tool_plan(self, body: ChatCompletionRequest) -> ToolPlan:
        try:
            return ToolPlan.of(body, self.tool_format)
        except ValueError as exc:
            message = str(exc)
            raise APIError(400, message, "tool_choice" if "tool_choice" in message else "tools") from None

    def chat_params(self, body: ChatCompletionRequest, max_tokens: int, logprobs: int | None,
                    tools: ToolPlan) -> SamplingParams:
        """The request's sampling, with the grammar that makes a required or named tool choice binding."""
        params = self.sampling_params(body, max_tokens, logprobs)
        if not tools.parses:
            return params
        if self.tool_marker_id is not None:
            params = dataclasses.replace(params, skip_special_tokens=False)
        if not tools.forced:
            return params
        if params.structured_output is not None:
            raise APIError(400, "a required or named tool_choice cannot be combined with response_format or "
                                "structured_outputs", "tool_choice")
        return dataclasses.replace(params, structured_output=StructuredOutputParams(
            grammar=tools.grammar(self.grammar_literal)))

    def grammar_literal(self, text: str) -> str:
        """`text` as a grammar must match it: a special token by its id (decoding never spells it out)."""
        token_id = self.tokenizer.special_token_id(text)
        return json.dumps(text) if token_id is None else f"<[{token_id}]>"

    async def chat(self, body: ChatCompletionRequest, request: Request) -> dict | ChatStream:
        """A chat completion: the response body, or (streaming) its chunks. /v1/responses and /v1/messages
        are adapters over this."""
        lora = self.check_model(body.model)
        self.check_generates()
        tools = self.tool_plan(body)
        prompt = self.chat_prompt(body.messages, body.add_generation_prompt, body, tools)
        asked, param = ((body.max_completion_tokens, "max_completion_tokens") if body.max_completion_tokens
                        else (body.max_tokens, "max_tokens"))
        max_tokens = self.max_tokens(asked, len(prompt.ids), param, "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self.chat_params(body, max_tokens, logprobs, tools)
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        probed = None if body.probes is None else await self.probe(prompt.ids, body.probes, lora)
        (gen,) = await self.start([request_id], [prompt], [params], lora)

        def choice_text() -> ChoiceText:
            return ChoiceText(self.splitter(prompt), tools.parser())

        if body.stream:
            chunks = _chat_stream(self, body, request_id, created, prompt, gen, choice_text)
            return ChatStream(len(prompt.ids), chunks if probed is None else _then_probes(chunks, probed))
        output = await _unless_gone(request, _final(gen))
        response = chat_response(request_id, created, self.model_name(lora), output, len(prompt.ids),
                                 logprobs, self.tokenizer, choice_text)
        return response if probed is None else {**response, "probes": probed}

    def splitter(self, prompt: _Prompt) -> ReasoningSplitter | None:
        return None if self.reasoning is None else ReasoningSplitter(self.reasoning, prompt.text or "")


def _one_or_many(given: str | list[str] | list[int] | list[list[int]]) -> list:
    """A prompt field as a list of prompts: one text or one list of ids is a single prompt."""
    return [given] if isinstance(given, str) or (given and isinstance(given[0], int)) else list(given)


def _api_error(exc: BaseException) -> BaseException:
    if isinstance(exc, QueueFullError):
        return APIError(503, str(exc), code="server_overloaded")
    if isinstance(exc, EngineDeadError):
        return APIError(500, str(exc))
    if isinstance(exc, (PagedLLMError, ValueError)):
        return APIError(400, str(exc), getattr(exc, "param", None))
    return exc


async def _unless_gone(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts its requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise APIError(499, "the client closed the request")


async def _final(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    try:
        async for last in outputs:
            pass
    except PagedLLMError as exc:
        raise _api_error(exc) from None
    return last


def build_app(client: AsyncEngineClient, config: ServerConfig, on_ready=None) -> FastAPI:
    server = OpenAIServer(client, config)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await client.start()
        if on_ready is not None:
            on_ready()
        yield
        await client.shutdown()

    app = FastAPI(title="pagedllm", lifespan=lifespan)
    app.state.server = server
    install_error_handlers(app)
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)
    auth = [Depends(_auth_dependency(config.api_key))]
    jobs = JobBoard(config.jobs_dir)

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

    @app.get("/v1/engine", dependencies=auth)
    async def engine_state() -> dict:
        """pagedllm's: the engine at this moment (requests, KV blocks, rates), for the web page's engine panel."""
        try:
            state = await client.call("snapshot")
        except PagedLLMError as exc:
            raise _api_error(exc) from None
        return {"object": "engine", "model": config.served_model_name, "max_model_len": client.info.max_model_len,
                "aborted": client.num_aborted, "batch_jobs": jobs.jobs(), **state}

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        created = int(time.time())
        card = {"id": config.served_model_name, "object": "model", "created": created, "owned_by": "pagedllm",
                "max_model_len": client.info.max_model_len}
        return {"object": "list", "data": [card] + [
            {**card, "id": name, "parent": config.served_model_name, "lora_rank": rank}
            for name, rank in client.adapters.items()]}

    @app.post("/v1/load_lora_adapter", dependencies=auth)
    async def load_lora_adapter(body: LoadLoRARequest) -> dict:
        """vLLM's: load an adapter from this machine's files, under a name requests then give as `model`."""
        server.check_lora_updates()
        if body.lora_name == config.served_model_name:
            raise APIError(400, "lora_name must differ from the served model's name", "lora_name")
        try:
            rank = await client.call("load_lora", body.lora_name, body.lora_path)
        except PagedLLMError as exc:
            raise APIError(400, str(exc), "lora_path") from None
        return {"object": "lora_adapter", "id": body.lora_name, "status": "loaded", "lora_rank": rank}

    @app.post("/v1/unload_lora_adapter", dependencies=auth)
    async def unload_lora_adapter(body: UnloadLoRARequest) -> dict:
        server.check_lora_updates()
        if body.lora_name not in client.adapters:
            raise APIError(404, f"no LoRA adapter named {body.lora_name!r} is loaded", "lora_name", "model_not_found")
        try:
            await client.call("unload_lora", body.lora_name)
        except PagedLLMError as exc:
            raise APIError(409, str(exc), "lora_name") from None
        return {"object": "lora_adapter", "id": body.lora_name, "status": "unloaded"}

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeRequest) -> dict:
        server.check_model(body.model)
        ids = server.one_prompt(body.prompt, body.messages, body.add_special_tokens).ids
        return {"tokens": ids, "count": len(ids), "max_model_len": client.info.max_model_len}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeRequest) -> dict:
        server.check_model(body.model)
        vocab = client.info.vocab_size
        if any(t < 0 or t >= vocab for t in body.tokens):
            raise APIError(400, f"tokens must be in [0, {vocab})", "tokens")
        return {"prompt": server.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.post("/v1/embeddings", dependencies=auth)
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
        params = SamplingParams(max_tokens=1, temperature=0, pooling=config.pooling)
        request_id = f"embd-{uuid.uuid4().hex}"
        gens = await server.start([f"{request_id}-{i}" for i in range(len(prompts))], prompts,
                                  [params] * len(prompts), lora)
        outputs = await _unless_gone(request, asyncio.gather(*(_final(g) for g in gens)))
        return embedding_response(server.model_name(lora), outputs, body.encoding_format)

    @app.post("/v1/completions", dependencies=auth)
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
            chunks = _completion_stream(server, body, request_id, created, prompts, gens, echo)
            return _sse(chunks if probed is None else _then_probes(chunks, probed))
        outputs = await _unless_gone(request, asyncio.gather(*(_final(g) for g in gens)))
        response = completion_response(request_id, created, server.model_name(lora), outputs, body.n, body.logprobs,
                                       server.tokenizer, body.return_token_ids, echo)
        return response if probed is None else {**response, "probes": probed}

    @app.post("/v1/inspect", dependencies=auth)
    async def inspect(body: InspectRequest) -> dict:
        """Probes on the serving model, without stopping it: the response of `pagedllm inspect --json`."""
        lora = server.check_model(body.model)
        prompt = server.one_prompt(body.prompt, body.messages)
        if len(prompt.ids) > client.info.max_model_len:
            raise APIError(400, f"This model's maximum context length is {client.info.max_model_len} tokens; the prompt "
                                f"has {len(prompt.ids)}.", "prompt", "context_length_exceeded")
        return {"object": "inspection", "model": server.model_name(lora), "num_layers": client.info.num_layers,
                "num_heads": client.info.num_heads, **await server.probe(prompt.ids, body, lora)}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        result = await server.chat(body, request)
        return _sse(result.chunks) if body.stream else result

    @app.post("/v1/responses", dependencies=auth)
    async def responses(body: ResponsesRequest, request: Request):
        result = await server.chat(body.as_chat(), request)
        builder = ResponseBuilder(body, config.served_model_name)
        if not body.stream:
            return builder.whole(result)
        return _event_stream(builder.events(result.chunks), lambda e: {
            "type": "error", "code": e.code or str(e.status), "message": e.message, "param": e.param})

    @app.post("/v1/messages", dependencies=auth)
    async def messages(body: MessagesRequest, request: Request):
        result = await server.chat(body.as_chat(), request)
        if not body.stream:
            return MessageBuilder(config.served_model_name).whole(result)
        builder = MessageBuilder(config.served_model_name, result.prompt_tokens)
        return _event_stream(builder.events(result.chunks), lambda e: anthropic_error_body(e.status, e.message))

    return app


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
    """Pure ASGI (a BaseHTTPMiddleware would hide client disconnects from the routes): POST bodies
    need a Content-Length, at most `limit` bytes."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            length = dict(scope["headers"]).get(b"content-length", b"")
            refusal = None
            if not length.isdigit():
                refusal = JSONResponse(error_body(411, "a Content-Length header is required"), status_code=411)
            elif int(length) > self.limit:
                refusal = JSONResponse(error_body(413, f"the request body is larger than {self.limit} bytes"),
                                       status_code=413)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except (APIError, PagedLLMError) as exc:  # the status line has gone out: the error travels as an event
            error = _api_error(exc)
            yield f"data: {json.dumps(error_body(error.status, error.message, error.param, error.code))}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(lines(), media_type="text/event-stream")


def _event_stream(events: AsyncIterator[dict], error_event: Callable[[APIError], dict]) -> StreamingResponse:
    """Server-sent events named after their type (the Responses and Anthropic streams); no [DONE]."""
    async def lines() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"
        except (APIError, PagedLLMError) as exc:
            error = error_event(_api_error(exc))
            yield f"event: error\ndata: {json.dumps(error)}\n\n"
    return StreamingResponse(lines(), media_type="text/event-stream")


async def _merge(gens: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several prompts as they come, tagged with the prompt's index."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, gen: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in gen:
                await queue.put((index, output))
        except Exception as exc:
            await queue.put((index, exc))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def _then_probes(chunks: AsyncIterator[dict], probed: dict | list[dict]) -> AsyncIterator[dict]:
    """A stream's chunks, then one more with no choices that carries the probes."""
    last = None
    async for last in chunks:
        yield last
    if last is not None:
        yield {key: last[key] for key in ("id", "object", "created", "model")} | {"choices": [], "probes": probed}


async def _completion_stream(server: OpenAIServer, body: CompletionRequest, request_id: str, created: int,
                             prompts: list[_Prompt], gens: list[AsyncIterator[RequestOutput]],
                             echo: list[Echo] | None) -> AsyncIterator[dict]:
    """With echo, each choice's first chunk carries the prompt (and its logprobs) in front of its text."""
    model, generated = body.model or server.config.served_model_name, {}  # checked: the base or an adapter
    async for index, output in _merge(gens):
        for c in output.outputs:
            if c.delta_text or c.finish_reason or c.delta_token_ids:
                choice = index * body.n + c.index
                first = echo is not None and choice not in generated
                c = echo[index].generated(c) if echo else c
                generated[choice] = len(c.token_ids)
                yield completion_chunk(request_id, created, model, choice, c, body.logprobs, server.tokenizer,
                                       body.return_token_ids, (output, echo[index]) if first else None)
    if body.stream_options and body.stream_options.include_usage:
        yield {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": [],
               "usage": usage(sum(len(p.ids) for p in prompts), sum(generated.values()))}


async def _chat_stream(server: OpenAIServer, body: ChatCompletionRequest, request_id: str, created: int,
                       prompt: _Prompt, gen: AsyncIterator[RequestOutput],
                       choice_text: Callable[[], ChoiceText]) -> AsyncIterator[dict]:
    """Each choice's deltas go through its own ChoiceText: reasoning, content and tool calls apart,
    text that may be a marker held back until the next delta (or the end)."""
    model, generated = body.model or server.config.served_model_name, {}  # checked: the base or an adapter
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    texts = {index: choice_text() for index in range(body.n)}
    for index in range(body.n):
        yield chat_chunk(request_id, created, model, index, {"role": "assistant", "content": ""})
    async for output in gen:
        for c in output.outputs:
            if c.delta_text or c.finish_reason or c.delta_token_ids:
                generated[c.index] = len(c.token_ids)
                text = texts[c.index]
                delta = text.delta(c.delta_text, c.finish_reason is not None)
                if delta == {"content": ""} and c.finish_reason is None and top_logprobs is None:
                    continue  # all held back (a call being written, a marker's beginning)
                yield chat_chunk(request_id, created, model, c.index, delta, c, top_logprobs, server.tokenizer,
                                 text.finish_reason(c.finish_reason))
    if body.stream_options and body.stream_options.include_usage:
        yield {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [], "usage": usage(len(prompt.ids), sum(generated.values()))}
