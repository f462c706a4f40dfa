"""OpenAIServer: what every route of the HTTP server shares — the request checks, prompts from text, token
ids or chat messages, sampling parameters, admission to the engine client and probes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request

from ...engine.core_client import AsyncEngineClient
from ...engine.outputs import RequestOutput
from ...errors import PagedLLMError
from ...pooling_params import PoolingParams
from ...sampling_params import SamplingParams, StructuredOutputParams
from ...tools.inspect import ProbeError
from .errors import APIError, api_error
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, ProbeRequest, SamplingFields
from .harmony import HarmonyParser
from .reasoning import REASONING_FORMATS, ReasoningSplitter, detect_format
from .responses import ChoiceText, chat_response
from .streams import chat_stream, then_probes
from .tool_calls import TOOL_FORMATS, detect_tool_format
from .tool_prompt import ToolPlan, template_reads_tools

T = TypeVar("T")
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
    lora_root: str | None = None  # ...only from under this folder (paths relative to it), when set


@dataclass(frozen=True)
class ChatStream:
    prompt_tokens: int
    chunks: AsyncIterator[dict]  # chat.completion.chunk bodies


@dataclass
class Prompt:
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
        # gpt-oss's harmony: one parser splits reasoning, answer and calls, read from the special tokens
        self.harmony = self.tool_format.name == "harmony"
        if self.harmony:
            self.reasoning = None
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

    def lora_path(self, path: str) -> str:
        """Where a run-time adapter is read from: with --lora-root, `path` taken relative to the root and
        refused when it resolves (symlinks followed) outside it, before anything is read; without, as given."""
        if self.config.lora_root is None:
            return path
        root = os.path.realpath(self.config.lora_root)
        resolved = os.path.realpath(os.path.join(root, path))
        if os.path.commonpath([root, resolved]) != root:
            raise APIError(400, "lora_path must be inside the server's --lora-root", "lora_path")
        return resolved

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
    async def start(self, request_ids: list[str], prompts: list[Prompt], params: list[SamplingParams | PoolingParams],
                    lora: str | None = None) -> list[AsyncIterator[RequestOutput]]:
        """Admit every prompt (or none: the ones admitted before a refusal are aborted)."""
        started = []
        try:
            for request_id, prompt, p in zip(request_ids, prompts, params):
                started.append(await self.client.add(request_id, {"prompt_token_ids": prompt.ids}, p, lora))
        except BaseException as exc:
            for request_id in request_ids[:len(started)]:
                self.client.abort(request_id)
            raise api_error(exc) from None
        return started

    async def probe(self, ids: list[int], probes: ProbeRequest, lora: str | None = None) -> dict:
        """Probes on a prompt (through a LoRA adapter where named), taken in the engine core between two
        steps on a KV cache of their own: the requests being served and their tokens are untouched."""
        try:
            result = await self.client.call("probe", ids, probes.layers, probes.top_k, probes.attention, lora)
        except ProbeError as exc:
            raise APIError(400, str(exc), "probes") from None
        except PagedLLMError as exc:
            raise api_error(exc) from None
        text = lambda t: self.tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
        result["tokens"] = [text(t) for t in ids]
        result["vocab"] = {str(t): text(t) for layer in result["layers"] for t, _ in layer["top_k"]}  # lens tokens
        return result

    def completion_prompts(self, body: CompletionRequest) -> list[Prompt]:
        if body.suffix is not None:
            return self.checked([self.fill_in_the_middle(p, body.suffix) for p in _one_or_many(body.prompt)],
                                "prompt")
        return self.prompts(body.prompt, "prompt")

    def prompts(self, given: str | list[str] | list[int] | list[list[int]], param: str) -> list[Prompt]:
        """One prompt or several, each text or token ids (the `prompt` of completions, embeddings' `input`)."""
        prompts = [Prompt(self.tokenizer.encode(p), p) if isinstance(p, str) else Prompt(list(p), None)
                   for p in _one_or_many(given)]
        return self.checked(prompts, param)

    async def one_prompt(self, prompt: str | list[int] | None, messages: list[ChatMessage] | None,
                         add_special_tokens: bool = True) -> Prompt:
        """The prompt of a body that takes exactly one of `prompt` (text or token ids) and chat `messages`."""
        if (prompt is None) == (messages is None):
            raise APIError(400, "give exactly one of prompt and messages", "prompt")
        if messages is not None:
            return await self.chat_prompt(messages)
        if isinstance(prompt, str):
            return Prompt(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens), prompt)
        return self.checked([Prompt(list(prompt), None)], "prompt")[0]

    def checked(self, prompts: list[Prompt], param: str) -> list[Prompt]:
        vocab = self.client.info.vocab_size
        if not prompts or any(not p.ids for p in prompts):
            raise APIError(400, f"{param} must not be empty", param)
        if any(t < 0 or t >= vocab for p in prompts for t in p.ids):
            raise APIError(400, f"{param} token ids must be in [0, {vocab})", param)
        return prompts

    def fill_in_the_middle(self, prefix: str | list[int], suffix: str) -> Prompt:
        if not isinstance(prefix, str):
            raise APIError(400, "suffix (fill-in-the-middle) needs a text prompt, not token ids", "suffix")
        ids = self.tokenizer.fill_in_the_middle(prefix, suffix)
        if ids is None:
            raise APIError(400, "suffix (fill-in-the-middle) needs a model with FIM tokens; this one has none",
                           "suffix")
        return Prompt(ids, prefix)

    def prompt_text(self, prompt: Prompt) -> str:
        return prompt.text if prompt.text is not None else self.tokenizer.decode(prompt.ids, skip_special_tokens=False)

    async def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                          body: ChatCompletionRequest | None = None, tools: ToolPlan | None = None) -> Prompt:
        """The rendered template (kept as the prompt's text: reasoning splitters look at its end) and its ids.
        Rendered off the event loop (a template may take up to its time budget), as is the tokenisation."""
        try:
            variables = body.template_variables() if body is not None else {}
        except ValueError as exc:
            raise APIError(400, str(exc), "chat_template_kwargs") from None
        try:
            inputs, tool_variables = (tools or ToolPlan(self.tool_format)).template_input(
                messages, self.template_reads_tools)
            text = await asyncio.to_thread(self.tokenizer.apply_chat_template, inputs, add_generation_prompt,
                                           **variables, **tool_variables)
        except (PagedLLMError, ValueError) as exc:
            raise APIError(400, str(exc), "messages") from None
        return Prompt(await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=False), text)

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
        if self.harmony:
            params = dataclasses.replace(params, skip_special_tokens=False)
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
        prompt = await self.chat_prompt(body.messages, body.add_generation_prompt, body, tools)
        asked, param = ((body.max_completion_tokens, "max_completion_tokens") if body.max_completion_tokens
                        else (body.max_tokens, "max_tokens"))
        max_tokens = self.max_tokens(asked, len(prompt.ids), param, "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self.chat_params(body, max_tokens, logprobs, tools)
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        probed = None if body.probes is None else await self.probe(prompt.ids, body.probes, lora)
        (gen,) = await self.start([request_id], [prompt], [params], lora)

        def choice_text() -> ChoiceText:
            if self.harmony:
                return ChoiceText(channels=HarmonyParser(tools.forced))
            return ChoiceText(self.splitter(prompt), tools.parser())

        if body.stream:
            chunks = chat_stream(self, body, request_id, created, prompt, gen, choice_text)
            return ChatStream(len(prompt.ids), chunks if probed is None else then_probes(chunks, probed))
        output = await unless_gone(request, final_output(gen))
        response = chat_response(request_id, created, self.model_name(lora), output, len(prompt.ids),
                                 logprobs, self.tokenizer, choice_text)
        return response if probed is None else {**response, "probes": probed}

    def splitter(self, prompt: Prompt) -> ReasoningSplitter | None:
        return None if self.reasoning is None else ReasoningSplitter(self.reasoning, prompt.text or "")




def _one_or_many(given: str | list[str] | list[int] | list[list[int]]) -> list:
    """A prompt field as a list of prompts: one text or one list of ids is a single prompt."""
    return [given] if isinstance(given, str) or (given and isinstance(given[0], int)) else list(given)


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts its requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise APIError(499, "the client closed the request")


async def final_output(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    try:
        async for last in outputs:
            pass
    except PagedLLMError as exc:
        raise api_error(exc) from None
    return last


