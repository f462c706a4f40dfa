"""Tool calling: how each model family writes a call, how calls are found in what the model wrote
(whole, or delta by delta while streaming), and the grammar that makes `tool_choice` binding.

A ToolFormat is one family's convention. It is chosen from the chat template (the first format
whose marker the template mentions) or named with --tool-call-parser; a new family is a subclass
added to TOOL_FORMATS. Formats:
- hermes: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call
  (Qwen2.5/Qwen3, Hermes 2/3, and the prompt pagedllm writes for templates without tool support);
- llama3_json: the message is `{"name": ..., "parameters": {...}}`, calls separated by `; `,
  optionally after `<|python_tag|>` (Llama 3.1-3.3 JSON tool calling);
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (Mistral v3 templates), or
  `[TOOL_CALLS]name[ARGS]{...}` (later ones);
- deepseek_v3: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>…` (V3.1),
  or V3-0324's / R1's `function<｜tool▁sep｜>NAME` with the arguments in a ```json block;
- glm45: `<tool_call>NAME` then `<arg_key>K</arg_key><arg_value>V</arg_value>` pairs, `</tool_call>` (GLM-4.5+);
- harmony: gpt-oss's `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>`,
  parsed together with the reasoning and the answer (harmony.py).

`tool_choice` "required" or a named function turns into a grammar (llguidance Lark with the
functions' JSON schemas embedded): the output is one call or more in the family's own format, so
it always parses and its arguments validate. "auto" parses whatever the model writes; text that
does not parse as calls stays content.
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .reasoning import marker_prefix_length

# Compact JSON with the separators models see in their training data (json.dumps' defaults).
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class FunctionSpec:
    """One function a request offers the model."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] = field(default_factory=lambda: dict(EMPTY_PARAMETERS))

    def as_template_tool(self) -> dict:
        """The shape chat templates read (Hugging Face's `tools` variable)."""
        function = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)
    id: str = field(default_factory=new_call_id)

    def as_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def call_from_json(value: Any, arguments_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | None:
    """A ToolCall from a decoded `{"name": ..., "arguments": {...}}`; None if it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = next((value[k] for k in arguments_keys if k in value), {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def decode_json_sequence(text: str, separator: str) -> list[Any] | None:
    """JSON values one after another, apart by `separator` (and whitespace); None unless all of `text` is."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            return values or None
        if values:
            if not text.startswith(separator, at):
                return None
            at += len(separator)
            while at < len(text) and text[at].isspace():
                at += 1
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        values.append(value)


class ToolFormat(ABC):
    """One family's way of writing calls. `start` opens the calls; `parse` reads the text from there on."""

    name = ""
    start = ""
    arguments_key = "arguments"
    separator = "\n"  # between parallel calls, in the grammar
    anywhere = True  # calls may follow some content (False: only at the start of the message)

    def matches(self, chat_template: str) -> bool:
        return self.start in chat_template

    def locate(self, text: str) -> tuple[int, int]:
        """(where the calls start in `text` or -1, how many characters at its end may begin the marker)."""
        at = text.find(self.start)
        return (at, 0) if at >= 0 else (-1, marker_prefix_length(text, self.start))

    @abstractmethod
    def parse(self, section: str) -> list[ToolCall] | None:
        """The calls in `section` (which starts with the marker); None if it is not calls."""

    def take_complete(self, section: str) -> tuple[list[ToolCall], str]:
        """Calls already complete at the front of a growing section, and the rest (streaming)."""
        return [], section

    def grammar(self, tools: list[FunctionSpec], parallel: bool, literal: Callable[[str], str]) -> str:
        """A Lark grammar whose sentences are one call (or, `parallel`, several) of `tools`.
        `literal` writes a marker as the grammar must match it (a special token by id)."""
        call = f"%json {json.dumps(self.call_schema(tools))}"
        return (f"start: {self.grammar_prefix(literal)} calls {self.grammar_suffix(literal)}\n"
                f"calls: call" + (f" ({json.dumps(self.separator)} call)*\n" if parallel else "\n")
                + f"call: {self.call_template(literal).format(call='body')}\nbody: {call}\n")

    def grammar_prefix(self, literal: Callable[[str], str]) -> str:
        return ""

    def grammar_suffix(self, literal: Callable[[str], str]) -> str:
        return ""

    def call_template(self, literal: Callable[[str], str]) -> str:
        return "{call}"

    def call_schema(self, tools: list[FunctionSpec]) -> dict:
        """The JSON of one call: the name is one of the tools' and the arguments follow its schema."""
        options = [{"type": "object", "properties": {"name": {"const": t.name}, self.arguments_key: t.parameters},
                    "required": ["name", self.arguments_key], "additionalProperties": False} for t in tools]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        return {**schema, "x-guidance": JSON_STYLE}

    @abstractmethod
    def render(self, calls: list[dict]) -> str:
        """Calls (OpenAI's message shape) as this format writes them: history for templates without tools."""


class HermesFormat(ToolFormat):
    name, start = "hermes", "<tool_call>"
    end = "</tool_call>"
    _block = re.compile(r"\s*<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def parse(self, section: str) -> list[ToolCall] | None:
        calls, at = [], 0
        while at < len(section.rstrip()):
            block = self._block.match(section, at)
            call = call_from_json(_loads(block.group(1))) if block else None
            if call is None:
                return None
            calls.append(call)
            at = block.end()
        return calls or None

    def take_complete(self, section: str) -> tuple[list[ToolCall], str]:
        calls = []
        while (end := section.find(self.end)) >= 0:
            done = self.parse(section[:end + len(self.end)])
            if done is None:
                break
            calls += done
            section = section[end + len(self.end):]
        return calls, section

    def call_template(self, literal: Callable[[str], str]) -> str:
        return f'{literal(self.start)} "\\n" {{call}} "\\n" {literal(self.end)}'

    def render(self, calls: list[dict]) -> str:
        return "\n".join(f'{self.start}\n{{"name": {json.dumps(c["name"])}, "arguments": {c["arguments"]}}}\n{self.end}'
                         for c in calls)


class Llama3JsonFormat(ToolFormat):
    name, start = "llama3_json", "<|python_tag|>"
    arguments_key, separator, anywhere = "parameters", "; ", False

    def matches(self, chat_template: str) -> bool:
        return self.start in chat_template or "ipython" in chat_template

    def locate(self, text: str) -> tuple[int, int]:
        body = text.lstrip()
        offset = len(text) - len(body)
        if body.startswith("{") or body.startswith(self.start):
            return offset, 0
        return -1, len(text) if self.start.startswith(body) else 0

    def parse(self, section: str) -> list[ToolCall] | None:
        section = section.strip().removeprefix(self.start)
        values = decode_json_sequence(section, ";")
        calls = [call_from_json(v, ("parameters", "arguments")) for v in values or []]
        return calls if calls and None not in calls else None

    def render(self, calls: list[dict]) -> str:
        return "; ".join(f'{{"name": {json.dumps(c["name"])}, "parameters": {c["arguments"]}}}' for c in calls)


class MistralFormat(ToolFormat):
    name, start = "mistral", "[TOOL_CALLS]"
    separator = ", "
    _named = re.compile(r"\s*([A-Za-z0-9_.-]+)\s*\[ARGS\]")

    def parse(self, section: str) -> list[ToolCall] | None:
        body = section.strip().removeprefix(self.start).strip().removesuffix("</s>").rstrip()
        if body.startswith("["):
            values = decode_json_sequence(body, ",")
            listed = values[0] if values and len(values) == 1 and isinstance(values[0], list) else None
            calls = [call_from_json(v) for v in listed or []]
            return calls if calls and None not in calls else None
        return self._parse_named(body)

    def _parse_named(self, body: str) -> list[ToolCall] | None:
        """The later form: name[ARGS]{...}, each call after its own [TOOL_CALLS]."""
        calls = []
        for part in body.split(self.start):
            head = self._named.match(part)
            arguments = _loads(part[head.end():]) if head else None
            if not isinstance(arguments, dict):
                return None
            calls.append(ToolCall(head.group(1), json.dumps(arguments, ensure_ascii=False)))
        return calls

    def grammar_prefix(self, literal: Callable[[str], str]) -> str:
        return f'{literal(self.start)} "["'

    def grammar_suffix(self, literal: Callable[[str], str]) -> str:
        return '"]"'

    def render(self, calls: list[dict]) -> str:
        items = ", ".join(f'{{"name": {json.dumps(c["name"])}, "arguments": {c["arguments"]}}}' for c in calls)
        return f"{self.start}[{items}]"


class DeepSeekFormat(ToolFormat):
    """DeepSeek V3 / V3.1 / R1: calls between `<｜tool▁calls▁begin｜>` and `<｜tool▁calls▁end｜>`, each
    `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{arguments}<｜tool▁call▁end｜>` (V3.1), or in V3-0324's and R1's form
    `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME` then the arguments in a ```json block. The markers are
    special tokens: decoding keeps them for the parser, grammars match them by id."""

    name, start = "deepseek_v3", "<｜tool▁calls▁begin｜>"
    end, call_begin, sep, call_end = "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
    _fenced = re.compile(r"function\s*$")

    def parse(self, section: str) -> list[ToolCall] | None:
        return _every_call(section.strip().removeprefix(self.start).split(self.end)[0], self.call_begin,
                           self.call_end, self._call)

    def _call(self, text: str) -> ToolCall | None:
        head, found, rest = text.partition(self.sep)
        if not found:
            return None
        if head.strip() == "function":  # V3-0324 / R1: NAME on the separator's line, then ```json … ```
            name, _, fenced = rest.partition("\n")
            arguments = _loads(fenced.strip().removeprefix("```json").removesuffix("```").strip())
        else:
            name, arguments = head, _loads(rest.strip())
        if not isinstance(arguments, dict) or not name.strip():
            return None
        return ToolCall(name.strip(), json.dumps(arguments, ensure_ascii=False))

    def take_complete(self, section: str) -> tuple[list[ToolCall], str]:
        """Each call as soon as its <｜tool▁call▁end｜> arrives; the closing <｜tool▁calls▁end｜> is dropped."""
        calls, section = _closed_calls(section, self.call_begin, self.call_end, self._call)
        if section.lstrip().startswith(self.end):  # only after a call: until then the section opens with start
            section = section.lstrip()[len(self.end):]
        return calls, section

    def grammar(self, tools: list[FunctionSpec], parallel: bool, literal: Callable[[str], str]) -> str:
        rules = [f"start: {literal(self.start)} call{'+' if parallel else ''} {literal(self.end)}",
                 "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
        for i, tool in enumerate(tools):
            rules.append(f"call_{i}: {literal(self.call_begin)} {json.dumps(tool.name)} {literal(self.sep)} args_{i} "
                         f"{literal(self.call_end)}")
            rules.append(f"args_{i}: %json {json.dumps({**tool.parameters, 'x-guidance': JSON_STYLE})}")
        return "\n".join(rules) + "\n"

    def render(self, calls: list[dict]) -> str:
        return self.start + "".join(f"{self.call_begin}{c['name']}{self.sep}{c['arguments']}{self.call_end}"
                                    for c in calls) + self.end


class Glm45Format(ToolFormat):
    """GLM-4.5 / 4.6 / 4.7: `<tool_call>NAME` then one `<arg_key>K</arg_key>` `<arg_value>V</arg_value>` pair a
    line per argument, `</tool_call>`; a value is JSON where it reads as JSON, else the text itself (strings
    are written bare). Chosen from templates that write `<arg_key>` (before Hermes, whose `<tool_call>` they
    share)."""

    name, start, end = "glm45", "<tool_call>", "</tool_call>"
    _pair = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)

    def matches(self, chat_template: str) -> bool:
        return "<arg_key>" in chat_template and self.start in chat_template

    def parse(self, section: str) -> list[ToolCall] | None:
        return _every_call(section, self.start, self.end, self._call)

    def _call(self, block: str) -> ToolCall | None:
        name = re.split(r"\n|<arg_key>", block, maxsplit=1)[0]
        rest = block[len(name):]
        if not name.strip() or self._pair.sub("", rest).strip():
            return None
        arguments = {key.strip(): _glm_value(value) for key, value in self._pair.findall(rest)}
        return ToolCall(name.strip(), json.dumps(arguments, ensure_ascii=False))

    def take_complete(self, section: str) -> tuple[list[ToolCall], str]:
        return _closed_calls(section, self.start, self.end, self._call)

    def grammar(self, tools: list[FunctionSpec], parallel: bool, literal: Callable[[str], str]) -> str:
        """Calls of the offered functions with their own argument names; values are free text (the XML form has
        no typed values to hold to a schema)."""
        rules = [f"start: call{('(' + json.dumps(chr(10)) + ' call)*') if parallel else ''}",
                 "call: " + " | ".join(f"call_{i}" for i in range(len(tools))),
                 r'value: /[^<]*/']
        for i, tool in enumerate(tools):
            keys = list((tool.parameters.get("properties") or {}).keys())
            pair = (f'{literal("<arg_key>")} ({" | ".join(json.dumps(k) for k in keys)}) {literal("</arg_key>")} "\\n" '
                    f'{literal("<arg_value>")} value {literal("</arg_value>")} "\\n"') if keys else '""'
            rules.append(f'call_{i}: {literal(self.start)} {json.dumps(tool.name + chr(10))} ({pair})* '
                         f'{literal(self.end)}')
        return "\n".join(rules) + "\n"

    def render(self, calls: list[dict]) -> str:
        out = []
        for c in calls:
            arguments = _loads(c["arguments"]) if isinstance(c["arguments"], str) else c["arguments"]
            pairs = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{v if isinstance(v, str) else json.dumps(v)}"
                            f"</arg_value>\n" for k, v in (arguments or {}).items())
            out.append(f"{self.start}{c['name']}\n{pairs}{self.end}")
        return "\n".join(out)


def _every_call(text: str, opener: str, closer: str, read: Callable[[str], ToolCall | None]) -> list[ToolCall] | None:
    """The calls of every `opener` … `closer` block in `text` (the closer may be missing at the end); None
    unless every block reads as a call."""
    calls = [read(block.split(closer)[0]) for block in text.split(opener)[1:]]
    return None if not calls or None in calls else calls


def _closed_calls(section: str, opener: str, closer: str, read: Callable[[str], ToolCall | None]
                  ) -> tuple[list[ToolCall], str]:
    """The calls at the front of a growing section that `closer` has closed (each read from the text after its
    `opener`), and the rest."""
    calls = []
    while (at := section.find(closer)) >= 0:
        call = read(section[:at].rpartition(opener)[2])
        if call is None:
            break
        calls.append(call)
        section = section[at + len(closer):]
    return calls, section


def _glm_value(text: str):
    value = _loads(text)
    return text if value is None and text.strip() != "null" else value


class HarmonyFormat(ToolFormat):
    """Tool calls in harmony (gpt-oss): chosen from templates that write harmony; parsed by HarmonyParser with
    the reasoning and the answer. A forced call (tool_choice required or named) is one commentary message to the
    function from the reply's first token, as the other formats' grammars force the call itself; the grammar then
    allows only a stop token (`<|call|>`, `<|return|>`), so one call a turn."""

    name, start = "harmony", "to=functions."

    def matches(self, chat_template: str) -> bool:
        from .harmony import is_harmony_template  # harmony.py builds on this module

        return is_harmony_template(chat_template)

    def parse(self, section: str) -> list[ToolCall] | None:
        from .harmony import HarmonyParser

        calls = HarmonyParser().parse(section)[2]
        return calls or None

    def grammar(self, tools: list[FunctionSpec], parallel: bool, literal: Callable[[str], str]) -> str:
        from .harmony import CHANNEL, CONSTRAIN, FUNCTIONS, MESSAGE

        rules = ["start: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
        for i, tool in enumerate(tools):
            schema = {**tool.parameters, "x-guidance": JSON_STYLE}
            rules.append(f'call_{i}: {literal(CHANNEL)} {json.dumps("commentary to=" + FUNCTIONS + tool.name + " ")} '
                         f'{literal(CONSTRAIN)} "json" {literal(MESSAGE)} args_{i}')
            rules.append(f"args_{i}: %json {json.dumps(schema)}")
        return "\n".join(rules) + "\n"

    def render(self, calls: list[dict]) -> str:
        from .harmony import CALL, CHANNEL, FUNCTIONS, MESSAGE, START

        return "".join(f"{START}assistant to={FUNCTIONS}{c['name']}{CHANNEL}commentary json{MESSAGE}{c['arguments']}"
                       f"{CALL}" for c in calls)


# Detection tries them in this order: GLM-4.5's templates also mention Hermes' <tool_call>.
TOOL_FORMATS: dict[str, ToolFormat] = {f.name: f for f in (HarmonyFormat(), Glm45Format(), DeepSeekFormat(),
                                                             HermesFormat(), MistralFormat(), Llama3JsonFormat())}
FALLBACK_FORMAT = "hermes"  # for templates that know no tool format: pagedllm writes the tool prompt itself


def detect_tool_format(chat_template: str | None) -> ToolFormat:
    for fmt in TOOL_FORMATS.values():
        if chat_template and fmt.matches(chat_template):
            return fmt
    return TOOL_FORMATS[FALLBACK_FORMAT]


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


class ToolCallParser:
    """Text in, (content, calls) out: all at once with `parse`, or delta by delta with `feed` then
    `finish`. Content flows until the format's marker; text that may begin one is held back. A
    section that does not parse as calls is given back as content at the end, unless the output was
    `forced` to be calls: then it can only be a call cut short by max_tokens, and is dropped."""

    def __init__(self, fmt: ToolFormat, forced: bool = False):
        self.fmt, self.forced = fmt, forced
        self.pending = ""  # content not yet given out
        self.section: str | None = None  # the calls' text, once the marker was seen
        self.searching = True
        self.calls: list[ToolCall] = []

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        content, calls = self.feed(text)
        rest_content, rest_calls = self.finish()
        return content + rest_content, calls + rest_calls

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        if self.section is not None:
            return "", self._take(delta)
        self.pending += delta
        if not self.searching:
            content, self.pending = self.pending, ""
            return content, []
        at, held = self.fmt.locate(self.pending)
        if at >= 0:
            content, self.section = self.pending[:at], ""
            rest, self.pending = self.pending[at:], ""
            return content, self._take(rest)
        content = self.pending[:len(self.pending) - held]
        self.pending = self.pending[len(content):]
        if content.strip() and not self.fmt.anywhere:
            self.searching = False
            content, self.pending = content + self.pending, ""
        return content, []

    def _take(self, delta: str) -> list[ToolCall]:
        calls, self.section = self.fmt.take_complete(self.section + delta)
        self.calls += calls
        return calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What was held back, once the text is complete."""
        content, self.pending = self.pending, ""
        if self.section is None or not self.section.strip():
            return content, []
        calls = self.fmt.parse(self.section)
        if calls is None:
            return (content if self.forced else content + self.section), []
        self.calls += calls
        return content, calls
