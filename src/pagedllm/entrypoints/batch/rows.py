"""Input rows of a batch job (one JSON object per line) and the records written for them.

A row: `id` (optional; the 1-based line number when absent), either `prompt` (text or token ids)
or chat `messages`, optional sampling settings under their OpenAI / vLLM names, which
override the job's defaults, and `lora`: the name of an adapter the job loaded (--lora-modules). `metadata` (any JSON) is copied to the output record untouched.
Any other key is an error: a typo in a million-row job should fail loudly, not be ignored.

Every non-blank input line gets exactly one output record, keyed by its line number:
a result (`text`, `finish_reason`, `prompt_tokens`, `completion_tokens`; `choices` when n > 1;
`logprobs` / `prompt_logprobs` in the chat API's shape when asked for) or an error (`error`, the
reason).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from ...engine.outputs import CompletionOutput, RequestOutput
from ...errors import shown
from ...sampling_params import SamplingParams
from ..openai.protocol import ChatMessage, ResponseFormat
from ..openai.responses import logprob_content
from ..text_input import LONE_SURROGATE, lone_surrogate_at

# Row keys that become SamplingParams fields of the same name.
SAMPLING_KEYS = frozenset({
    "n", "best_of", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "logit_bias", "seed", "stop", "stop_token_ids", "ignore_eos",
    "skip_special_tokens", "use_beam_search", "length_penalty", "early_stopping", "num_beam_groups",
    "diversity_penalty", "penalty_alpha", "logprobs", "prompt_logprobs"})
OTHER_KEYS = frozenset({"id", "prompt", "messages", "metadata", "response_format", "lora"})
_MESSAGES = TypeAdapter(list[ChatMessage])
_RESPONSE_FORMAT = TypeAdapter(ResponseFormat)


class RowError(ValueError):
    """A malformed row; the message says what is wrong with it."""


@dataclass(frozen=True)
class BatchTask:
    """A valid row, ready for a worker: what to generate and how."""

    line: int
    id: Any
    prompt: str | list[int] | None
    messages: list[dict[str, str]] | None
    params: SamplingParams
    metadata: Any = None
    lora: str | None = None  # a LoRA adapter's name
    explicit_max_tokens: bool = False  # the row set max_tokens: past what the context leaves, it is refused


def row_id(row: Any, line: int) -> Any:
    """The id a row's records carry: its own `id` when it has a usable one, else its line number."""
    return row["id"] if isinstance(row, dict) and _usable_id(row.get("id")) else line


def _usable_id(value: Any) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def load_row(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RowError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise RowError("not usable JSON: nested too deep") from None
    except ValueError:  # an integer past Python's 4,300-digit conversion limit
        raise RowError("not usable JSON: a number with too many digits") from None


def parse_row(row: Any, line: int, defaults: SamplingParams) -> BatchTask:
    """One decoded input row → a BatchTask; RowError names the problem."""
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {type(row).__name__}")
    broken = lone_surrogate_at(row)
    if broken is not None:
        raise RowError(f"{broken}: {LONE_SURROGATE}")
    unknown = sorted(set(row) - SAMPLING_KEYS - OTHER_KEYS)
    if unknown:
        raise RowError(f"unknown field {shown(unknown[0])} (sampling settings use OpenAI / vLLM names)")
    if "id" in row and not _usable_id(row["id"]):
        raise RowError("id must be a string or an integer")
    prompt, messages = _prompt(row)
    lora = row.get("lora")
    if lora is not None and not isinstance(lora, str):
        raise RowError("lora must be the name of a LoRA adapter (a string)")
    return BatchTask(line, row_id(row, line), prompt, messages, _params(row, defaults), row.get("metadata"), lora,
                     "max_tokens" in row)


def _prompt(row: dict) -> tuple[str | list[int] | None, list[dict[str, str]] | None]:
    has_prompt, has_messages = "prompt" in row, "messages" in row
    if has_prompt == has_messages:
        raise RowError("a row needs exactly one of 'prompt' or 'messages'")
    if has_messages:
        try:
            messages = _MESSAGES.validate_python(row["messages"])
        except ValidationError as exc:
            raise RowError(f"messages: {_first_error(exc)}") from None
        if not messages:
            raise RowError("messages must not be empty")
        try:
            return None, [m.as_template_input() for m in messages]
        except ValueError as exc:
            raise RowError(f"messages: {exc}") from None
    prompt = row["prompt"]
    if isinstance(prompt, str) and prompt:
        return prompt, None
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt, None
    raise RowError("prompt must be a non-empty string or a non-empty list of token ids")


def _params(row: dict, defaults: SamplingParams) -> SamplingParams:
    overrides = {key: row[key] for key in SAMPLING_KEYS & set(row)}  # SamplingParams turns lists into tuples
    if "response_format" in row:
        try:
            overrides["structured_output"] = _RESPONSE_FORMAT.validate_python(row["response_format"]).structured_output()
        except ValidationError as exc:
            raise RowError(f"response_format: {_first_error(exc)}") from None
        except ValueError as exc:
            raise RowError(str(exc)) from None
    try:
        return dataclasses.replace(defaults, **overrides)
    except (ValueError, TypeError) as exc:
        raise RowError(str(exc)) from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


def error_record(line: int, id_: Any, reason: str) -> dict[str, Any]:
    return {"id": id_, "line": line, "error": reason}


def result_record(task: BatchTask, output: RequestOutput) -> dict[str, Any]:
    first = output.outputs[0]
    record = {"id": task.id, "line": task.line, "text": first.text, "finish_reason": first.finish_reason,
              "prompt_tokens": len(output.prompt_token_ids),
              "completion_tokens": sum(len(c.token_ids) for c in output.outputs)}
    record.update(_logprobs(first, task.params))
    if len(output.outputs) > 1:
        record["choices"] = [{"text": c.text, "finish_reason": c.finish_reason, "completion_tokens": len(c.token_ids),
                              **_logprobs(c, task.params)} for c in output.outputs]
    if task.params.prompt_logprobs is not None:
        record["prompt_logprobs"] = logprob_content(output.prompt_token_ids, output.prompt_logprobs or [],
                                                    task.params.prompt_logprobs)
    if task.metadata is not None:
        record["metadata"] = task.metadata
    return record


def _logprobs(completion: CompletionOutput, params: SamplingParams) -> dict[str, Any]:
    if params.logprobs is None:
        return {}
    return {"logprobs": logprob_content(completion.token_ids, completion.logprobs or [], params.logprobs)}
