"""Tool call formats on fixed model outputs (tiny models do not call tools on their own): parsed whole
and streamed in every split, their grammars accept exactly the calls, and templates see the tools."""

from __future__ import annotations

import json

import pytest
from llguidance import LLMatcher, LLTokenizer

from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest
from pagedllm.entrypoints.openai.tool_calls import (TOOL_FORMATS, FunctionSpec, ToolCallParser, detect_tool_format)
from pagedllm.entrypoints.openai.tool_prompt import ToolPlan, template_reads_tools
from pagedllm.models.loaders import ModelSource
from pagedllm.tokenizer import load_tokenizer
from pagedllm.tokenizer.chat_template import render_chat

WEATHER = FunctionSpec("get_weather", "The weather in a city",
                       {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
ADD = FunctionSpec("add", None, {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                 "required": ["a", "b"], "additionalProperties": False})

# (format, model output, content, [(name, arguments)])
OUTPUTS = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "",
     [("get_weather", {"city": "Paris"})]),
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', "Let me check.\n",
     [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]),
    ("hermes", '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}', "",  # unclosed, string args
     [("add", {"a": 1, "b": 2})]),
    ("hermes", "No tools needed: 2 < 3.", "No tools needed: 2 < 3.", []),
    ("hermes", "<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", {"city": "Paris"})]),
    ("llama3_json", '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
                    '{"name": "get_weather", "parameters": {"city": "Oslo"}}', "",
     [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo"})]),
    ("llama3_json", 'The answer is {"name": "x"}.', 'The answer is {"name": "x"}.', []),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                '{"name": "add", "arguments": {"a": 1, "b": 2}}]</s>', "",
     [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]),
    ("mistral", 'Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}', "Sure. ",
     [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]),
    ("mistral", "[TOOL_CALLS] nonsense", "[TOOL_CALLS] nonsense", []),
    ("deepseek_v3", 'Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}'
                    '<｜tool▁call▁end｜><｜tool▁call▁begin｜>add<｜tool▁sep｜>{"a": 1, "b": 2}<｜tool▁call▁end｜>'
                    '<｜tool▁calls▁end｜>', "Sure.", [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]),
    ("deepseek_v3", '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n'
                    '{"city": "Oslo"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>', "",
     [("get_weather", {"city": "Oslo"})]),  # V3-0324's and R1's form
    ("deepseek_v3", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>broken", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>broken",
     []),
    ("glm45", 'Let me look.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n'
              '</tool_call>\n<tool_call>add\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n<arg_key>b</arg_key>\n'
              '<arg_value>2</arg_value>\n</tool_call>', "Let me look.\n",
     [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]),
    ("glm45", "<tool_call>get_time\n</tool_call>", "", [("get_time", {})]),
    ("glm45", "<tool_call>get_weather\nno pairs here\n</tool_call>", "<tool_call>get_weather\nno pairs here\n</tool_call>",
     []),
]


def _named(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("fmt, text, content, calls", OUTPUTS)
def test_parse_whole_and_streamed(fmt, text, content, calls):
    parsed_content, parsed = ToolCallParser(TOOL_FORMATS[fmt]).parse(text)
    assert (parsed_content, _named(parsed)) == (content, calls)
    for step in (1, 3, 7):  # delta by delta: the same content and calls, whatever the split
        parser, streamed_content, streamed = ToolCallParser(TOOL_FORMATS[fmt]), "", []
        for at in range(0, len(text), step):
            more, new = parser.feed(text[at:at + step])
            streamed_content, streamed = streamed_content + more, streamed + new
        more, new = parser.finish()
        assert (streamed_content + more, _named(streamed + new)) == (content, calls)


def test_hermes_streams_each_call_when_it_closes():
    parser = ToolCallParser(TOOL_FORMATS["hermes"])
    assert parser.feed('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool') == ("", [])
    content, calls = parser.feed("_call>\n<tool_call>")
    assert content == "" and _named(calls) == [("add", {"a": 1, "b": 2})]


def test_content_before_a_marker_is_not_held_longer_than_needed():
    parser = ToolCallParser(TOOL_FORMATS["hermes"])
    assert parser.feed("Hello <tool") == ("Hello ", [])
    assert parser.feed("s are fun") == ("<tools are fun", [])


@pytest.mark.parametrize("template, expected", [
    ("{% for t in tools %}{% endfor %}<tool_call>", "hermes"),
    ("{{ '[TOOL_CALLS]' }}{{ tools }}", "mistral"),
    ("{% if message.role == 'ipython' %}<|python_tag|>{% endif %}", "llama3_json"),
    ("{{ messages }}", "hermes"),  # no tool support: pagedllm writes the tool prompt in hermes' format
    ("<tool_call>{{ tc.name }}\n<arg_key>{{ k }}</arg_key>", "glm45"),  # GLM-4.5's, before Hermes' <tool_call>
    ("{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + name }}", "deepseek_v3"),
    ("<|start|>assistant<|channel|>final<|message|>", "harmony"),
])
def test_format_detected_from_the_template(template, expected):
    assert detect_tool_format(template).name == expected


@pytest.fixture(scope="module")
def ll_tokenizer(default_gguf):
    tokenizer = load_tokenizer(ModelSource("gguf", default_gguf))
    return tokenizer, LLTokenizer(tokenizer.backend.to_str(), eos_token=sorted(tokenizer.stop_token_ids))


def _accepts(ll_tokenizer, grammar: str, token_ids: list[int]) -> bool:
    tokenizer, ll = ll_tokenizer
    matcher = LLMatcher(ll, LLMatcher.grammar_from_lark(grammar), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return all(matcher.consume_token(t) for t in token_ids) and matcher.is_accepting()


@pytest.mark.parametrize("fmt, text, ok", [
    ("hermes", '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', True),
    ("hermes", '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', True),
    ("hermes", '<tool_call>\n{"name": "add", "arguments": {"a": "one", "b": 2}}\n</tool_call>', False),
    ("hermes", '<tool_call>\n{"name": "subtract", "arguments": {"a": 1, "b": 2}}\n</tool_call>', False),
    ("llama3_json", '{"name": "add", "parameters": {"a": 1, "b": 2}}; '
                    '{"name": "get_weather", "parameters": {"city": "Oslo"}}', True),
    ("llama3_json", '{"name": "add", "parameters": {"a": 1}}', False),
    ("deepseek_v3", '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>add<｜tool▁sep｜>{"a": 1, "b": 2}<｜tool▁call▁end｜>'
                    '<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Oslo"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>', True),
    ("deepseek_v3", '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>add<｜tool▁sep｜>{"a": "x", "b": 2}<｜tool▁call▁end｜>'
                    '<｜tool▁calls▁end｜>', False),
    ("glm45", "<tool_call>add\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n<arg_key>b</arg_key>\n"
              "<arg_value>2</arg_value>\n</tool_call>", True),
    ("glm45", "<tool_call>add\n<arg_key>c</arg_key>\n<arg_value>1</arg_value>\n</tool_call>", False),
])
def test_required_grammar_accepts_exactly_valid_calls(ll_tokenizer, fmt, text, ok):
    tokenizer, _ = ll_tokenizer
    grammar = TOOL_FORMATS[fmt].grammar([WEATHER, ADD], parallel=True, literal=json.dumps)
    assert _accepts(ll_tokenizer, grammar, tokenizer.encode(text, add_special_tokens=False)) == ok
    parsed = ToolCallParser(TOOL_FORMATS[fmt]).parse(text)[1]
    assert bool(parsed) or not ok


def test_a_special_token_marker_is_matched_by_id(ll_tokenizer):
    """Mistral's [TOOL_CALLS] is a control token: the grammar names its id (here <|im_start|>'s stands in)."""
    tokenizer, _ = ll_tokenizer
    marker = tokenizer.special_token_id("<|im_start|>")
    grammar = TOOL_FORMATS["mistral"].grammar([ADD], parallel=False, literal=lambda text: f"<[{marker}]>")
    body = tokenizer.encode('[{"name": "add", "arguments": {"a": 1, "b": 2}}]', add_special_tokens=False)
    assert _accepts(ll_tokenizer, grammar, [marker] + body)
    assert not _accepts(ll_tokenizer, grammar, tokenizer.encode("[TOOL_CALLS]", add_special_tokens=False) + body)


def test_named_choice_allows_one_call_of_that_function(ll_tokenizer):
    tokenizer, _ = ll_tokenizer
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}],
                                 tools=[{"type": "function", "function": {"name": f.name, "parameters": f.parameters}}
                                        for f in (WEATHER, ADD)],
                                 tool_choice={"type": "function", "function": {"name": "add"}})
    grammar = ToolPlan.of(body, TOOL_FORMATS["hermes"]).grammar(json.dumps)
    one = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    assert _accepts(ll_tokenizer, grammar, tokenizer.encode(one, add_special_tokens=False))
    assert not _accepts(ll_tokenizer, grammar, tokenizer.encode(one + "\n" + one, add_special_tokens=False))
    weather = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert not _accepts(ll_tokenizer, grammar, tokenizer.encode(weather, add_special_tokens=False))


@pytest.mark.parametrize("tools, choice, error", [
    ([], "required", "tool_choice needs tools"),
    (["add"], {"type": "function", "function": {"name": "nope"}}, "not among the tools"),
    (["add", "add"], None, "unique"),
])
def test_tool_plan_refuses_inconsistent_requests(tools, choice, error):
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tool_choice=choice,
                                 tools=[{"type": "function", "function": {"name": n}} for n in tools] or None)
    with pytest.raises(ValueError, match=error):
        ToolPlan.of(body, TOOL_FORMATS["hermes"])


# A small template in the way Qwen's and Hermes' read tools (written for this test).
TOOL_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function | tojson }}{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}[{{ m.role }}]"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}"
    "</tool_call>{% endfor %}{% elif m.role == 'tool' %}{{ m.name }}#{{ m.tool_call_id }}={{ m.content }}"
    "{% else %}{{ m.content }}{% endif %}\n{% endfor %}")

HISTORY = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None,
            "tool_calls": [{"id": "call_1", "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]


def test_templates_that_read_tools_get_them_and_the_history():
    body = ChatCompletionRequest(messages=HISTORY, tools=[{"type": "function", "function": {
        "name": "get_weather", "description": "weather <now>", "parameters": WEATHER.parameters}}])
    plan = ToolPlan.of(body, TOOL_FORMATS["hermes"])
    assert template_reads_tools(TOOL_TEMPLATE)
    messages, variables = plan.template_input(body.messages, reads_tools=True)
    text = render_chat(TOOL_TEMPLATE, messages, **variables)
    assert '"description": "weather <now>"' in text  # tojson as Hugging Face's: no HTML escapes
    assert '[assistant]<tool_call>get_weather {"city": "Paris"}</tool_call>' in text  # arguments decoded
    assert "[tool]get_weather#call_1=18 C, sunny" in text  # the tool message named after its call


def test_tool_choice_none_does_not_tell_the_model():
    body = ChatCompletionRequest(messages=HISTORY[:1], tool_choice="none",
                                 tools=[{"type": "function", "function": {"name": "get_weather"}}])
    messages, variables = ToolPlan.of(body, TOOL_FORMATS["hermes"]).template_input(body.messages, reads_tools=True)
    assert variables == {} and messages == [{"role": "user", "content": "Weather in Paris?"}]


def test_templates_without_tools_get_them_written_out():
    body = ChatCompletionRequest(messages=[{"role": "system", "content": "Be brief."}, *HISTORY],
                                 tools=[{"type": "function", "function": {"name": "get_weather",
                                                                          "parameters": WEATHER.parameters}}])
    messages, variables = ToolPlan.of(body, TOOL_FORMATS["hermes"]).template_input(body.messages, reads_tools=False)
    assert variables == {}
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.\n\n")
    assert '"name": "get_weather"' in messages[0]["content"] and "<tool_call>" in messages[0]["content"]
    assert messages[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": '
                                                           '{"city": "Paris"}}\n</tool_call>'}
    assert messages[3] == {"role": "user", "content": "<tool_response>\n18 C, sunny\n</tool_response>"}


def test_a_forced_call_cut_short_is_not_content():
    """With `required` the grammar allows only calls: a tail cut by max_tokens is dropped, not shown as text."""
    text = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n<tool_call>\n{"name": "ad'
    assert _named(ToolCallParser(TOOL_FORMATS["hermes"], forced=True).parse(text)[1]) == [("add", {"a": 1, "b": 2})]
    assert ToolCallParser(TOOL_FORMATS["hermes"], forced=True).parse(text)[0] == ""
    assert ToolCallParser(TOOL_FORMATS["hermes"]).parse(text)[0].startswith("\n<tool_call>")
