"""A chat request's tools, as the model sees them and as the server enforces them.

Templates that know tools (they read a `tools` variable: Qwen, Llama 3.1+, Mistral, Hermes…) get
the functions in that variable, earlier calls as assistant `tool_calls` (arguments decoded, as
Hugging Face templates expect) and results as `tool` messages. Templates that do not (SmolLM2's,
plain ChatML) get the same conversation written out: the functions in a system message, with the
format's example of a call; earlier calls in the format inside the assistant's text; each result
as a user message in `<tool_response>` tags.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .protocol import ChatCompletionRequest, ChatMessage
from .tool_calls import FunctionSpec, ToolCallParser, ToolFormat

_READS_TOOLS = re.compile(r"\btools\b")


def template_reads_tools(chat_template: str | None) -> bool:
    return bool(chat_template and _READS_TOOLS.search(chat_template))


@dataclass(frozen=True)
class ToolPlan:
    """`choice`: "none", "auto", "required" or the name of the one function to call."""

    fmt: ToolFormat
    tools: tuple[FunctionSpec, ...] = ()
    choice: str = "none"
    parallel: bool = True

    @classmethod
    def of(cls, body: ChatCompletionRequest, fmt: ToolFormat) -> ToolPlan:
        """The request's tools and choice, checked (ValueError names the field)."""
        tools = tuple(FunctionSpec(t.function.name, t.function.description, t.function.parameters or
                                   {"type": "object", "properties": {}}) for t in body.tools or ())
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        choice = body.tool_choice
        if choice is None:
            choice = "auto" if tools else "none"
        elif not isinstance(choice, str):
            choice = choice.function.name
            if choice not in names:
                raise ValueError(f"tool_choice names the function {choice!r}, which is not among the tools")
        if choice != "none" and not tools:
            raise ValueError("tool_choice needs tools")
        return cls(fmt, tools, choice, body.parallel_tool_calls)

    @property
    def parses(self) -> bool:
        return self.choice != "none"

    @property
    def forced(self) -> bool:
        """`required` or a named function: a grammar makes the output calls."""
        return self.choice not in ("none", "auto")

    def grammar(self, literal: Callable[[str], str]) -> str:
        chosen = [t for t in self.tools if self.choice in ("required", t.name)]
        return self.fmt.grammar(chosen, self.parallel and self.choice == "required", literal)

    def parser(self) -> ToolCallParser | None:
        return ToolCallParser(self.fmt, self.forced) if self.parses else None

    def template_input(self, messages: list[ChatMessage], reads_tools: bool) -> tuple[list[dict], dict[str, Any]]:
        """The messages and variables for the chat template. With `none`, the model is not told of tools."""
        offered = list(self.tools) if self.parses else []
        if reads_tools:
            return _with_tool_fields(messages), ({"tools": [t.as_template_tool() for t in offered]} if offered else {})
        return _written_out(messages, offered, self.fmt), {}


def _call_names(messages: list[ChatMessage]) -> dict[str, str]:
    return {c.id: c.function.name for m in messages for c in m.tool_calls or () if c.id}


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _with_tool_fields(messages: list[ChatMessage]) -> list[dict]:
    names, out = _call_names(messages), []
    for m in messages:
        item = m.as_template_input()
        if m.tool_calls:
            item["tool_calls"] = [{"id": c.id, "type": "function",
                                   "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                  for c in m.tool_calls]
        if m.role == "tool":
            item["tool_call_id"] = m.tool_call_id
            item["name"] = m.name or names.get(m.tool_call_id, "")
        out.append(item)
    return out


def tools_system_prompt(tools: list[FunctionSpec], fmt: ToolFormat) -> str:
    listed = "\n".join(json.dumps(t.as_template_tool(), ensure_ascii=False) for t in tools)
    example = fmt.render([{"name": "<function-name>", "arguments": "<arguments-json-object>"}])
    return (f"You can call functions. They are described by JSON schemas within <tools></tools>:\n<tools>\n{listed}\n"
            f"</tools>\n\nTo call one, write its name and arguments as follows:\n{example}")


def _written_out(messages: list[ChatMessage], tools: list[FunctionSpec], fmt: ToolFormat) -> list[dict]:
    out = []
    for m in messages:
        item = m.as_template_input()
        if m.tool_calls:
            calls = fmt.render([{"name": c.function.name, "arguments": c.function.arguments} for c in m.tool_calls])
            item["content"] = f"{item['content']}\n{calls}" if item["content"] else calls
        if m.role == "tool":
            item = {"role": "user", "content": f"<tool_response>\n{item['content']}\n</tool_response>"}
        out.append(item)
    if tools:
        prompt = tools_system_prompt(tools, fmt)
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out
