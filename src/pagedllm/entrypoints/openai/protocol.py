"""Request bodies of the OpenAI-compatible API, as pydantic models, and their SamplingParams.

Field names and defaults follow OpenAI; vLLM's extra sampling fields (top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, stop_token_ids, skip_special_tokens, beam search)
are accepted too. Unknown fields are ignored, as OpenAI-compatible servers do. Range checks live
in SamplingParams, whose errors name the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from ...sampling_params import StructuredOutputParams
from ..text_input import LONE_SURROGATE, lone_surrogate_at
from ...sampling_params import SamplingParams

STRUCTURED_OUTPUT_KEYS = {"json", "json_object", "regex", "choice", "grammar"}
# Names a chat template is given by the server itself, which chat_template_kwargs may not replace.
RESERVED_TEMPLATE_NAMES = {"messages", "add_generation_prompt", "bos_token", "eos_token"}
MAX_N = 16  # completions per request
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


class RequestBody(BaseModel):
    """A request's body: every route's model derives from it, so text that is not valid Unicode is refused
    with a 400 that names the field before any other check reads it."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        path = lone_surrogate_at(data)
        if path is not None:
            raise PydanticCustomError("lone_surrogate", "{field}: " + LONE_SURROGATE, {"field": path})
        return data


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str = "response"
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def structured_output(self) -> StructuredOutputParams | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputParams(json_object=True)
        if self.json_schema is None or self.json_schema.json_schema is None:
            raise ValueError("response_format.json_schema.schema is required for type json_schema")
        return StructuredOutputParams(json=self.json_schema.json_schema)


class ProbeRequest(RequestBody):
    """pagedllm's probes (tools/inspect.py) on a prompt: the layers to read (None: all), the logit lens's
    top-K, and attention weights as 'L:H:i:j' strings (* or left out: all)."""

    model_config = ConfigDict(extra="ignore")

    layers: list[int] | None = Field(None, max_length=1024)
    top_k: int = Field(5, ge=1, le=100)
    attention: list[str] = Field(default_factory=list, max_length=64)


class SamplingFields(RequestBody):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    user: str | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM's: exactly one of json, json_object, regex, choice, grammar
    probes: ProbeRequest | None = None  # pagedllm's: probes on the prompt, returned beside the choices

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        def given(name: str, default: Any) -> Any:
            value = getattr(self, name)
            return default if value is None else value

        return SamplingParams(
            n=self.n, best_of=self.best_of, max_tokens=max_tokens, min_tokens=min(self.min_tokens, max_tokens),
            temperature=given("temperature", 1.0), top_p=given("top_p", 1.0), top_k=given("top_k", -1),
            min_p=given("min_p", 0.0), presence_penalty=given("presence_penalty", 0.0),
            frequency_penalty=given("frequency_penalty", 0.0), repetition_penalty=given("repetition_penalty", 1.0),
            logit_bias=self.logit_bias or {}, seed=self.seed, stop=self.stop or (),
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens, structured_output=self.structured_output(),
            use_beam_search=self.use_beam_search, length_penalty=self.length_penalty)

    def structured_output(self) -> StructuredOutputParams | None:
        from_format = None if self.response_format is None else self.response_format.structured_output()
        if self.structured_outputs is None:
            return from_format
        if from_format is not None:
            raise ValueError("structured_outputs and a response_format other than text cannot both be given")
        unknown = set(self.structured_outputs) - STRUCTURED_OUTPUT_KEYS
        if unknown:
            raise ValueError(f"structured_outputs takes {', '.join(sorted(STRUCTURED_OUTPUT_KEYS))}; got "
                             f"{', '.join(sorted(unknown))}")
        try:
            return StructuredOutputParams(**self.structured_outputs)
        except ValueError as exc:
            raise ValueError(f"structured_outputs is invalid: {exc}") from None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # None: COMPLETIONS_MAX_TOKENS, within the limits; 0 with echo
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False  # the prompt in front of the text, and with logprobs its tokens' logprobs (scoring)
    suffix: str | None = None  # fill-in-the-middle, where the model has FIM tokens
    return_token_ids: bool = False  # vLLM's extension: the generated token ids in each choice


NON_TEXT_PARTS = ("image_url", "image", "input_image", "input_audio", "audio_url", "audio", "video_url", "file",
                  "input_file")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None

    def as_text(self) -> str:
        if self.type in NON_TEXT_PARTS:
            raise ValueError(f"this model reads text only: a content part of type {self.type!r} cannot be given to it")
        if self.type != "text":
            raise ValueError(f"unknown content part type {self.type!r} (this model reads 'text' parts)")
        if self.text is None:
            raise ValueError("a content part of type 'text' needs a 'text' field")
        return self.text


TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names


class FunctionCallIn(BaseModel):
    name: str
    arguments: str = "{}"  # a JSON object, as text


class ToolCallIn(BaseModel):
    """A call an earlier assistant message made (the conversation's history)."""
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # on assistant messages
    tool_call_id: str | None = None  # on tool messages: the call this is the result of
    reasoning_content: str | None = None  # on assistant messages: their reasoning, as this server returned it

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.as_text() for part in self.content)
        return self.content or ""

    def as_template_input(self) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role
        item = {"role": role, "content": self.text()}
        if self.reasoning_content:  # Qwen3's templates read reasoning_content, gpt-oss's thinking
            item["reasoning_content"] = item["thinking"] = self.reasoning_content
        return item


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of an object; none: no arguments
    strict: bool | None = None


class ChatTool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # default: auto with tools
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None  # more template variables, e.g. {"enable_thinking": false}

    def template_variables(self) -> dict[str, Any]:
        given = self.chat_template_kwargs or {}
        clash = sorted(RESERVED_TEMPLATE_NAMES & set(given))
        if clash:
            raise ValueError(f"chat_template_kwargs may not set {', '.join(clash)}")
        return given


class TokenizeRequest(RequestBody):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True


class LoadLoRARequest(RequestBody):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoRARequest(RequestBody):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=256)


class DetokenizeRequest(RequestBody):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


class EmbeddingRequest(RequestBody):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class InspectRequest(ProbeRequest):
    """POST /v1/inspect: probes on a prompt (text or token ids) or on chat messages, nothing generated."""

    model: str | None = None
    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
