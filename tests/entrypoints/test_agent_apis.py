"""What agents speak, through their own clients against a live server on 127.0.0.1 serving the default
model: tool calling with `openai` and LangChain's ChatOpenAI (the model's template has no tool support:
the server writes the tools out for it), OpenAI's Responses API, and Anthropic's Messages API with the
`anthropic` client. Tiny models do not call tools on their own, so correctness is checked with
`required` and named choices, which a grammar enforces."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from live_server import LiveServer
from pagedllm.entrypoints.openai.protocol import ChatMessage

KEY, MODEL = "sk-test", "smollm"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server():
    with LiveServer(served_model_name=MODEL, api_key=KEY, max_model_len=1024, max_tokens_limit=256) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def _valid(call, tool: dict) -> dict:
    """The call names `tool` and its arguments hold the required keys with the schema's types."""
    schema = tool["function"]["parameters"]
    assert call.type == "function" and call.function.name == tool["function"]["name"] and call.id
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == set(schema["required"])
    types = {"string": str, "integer": int}
    assert all(isinstance(arguments[k], types[schema["properties"][k]["type"]]) for k in arguments)
    return arguments


def _create(client, messages=ASK, max_tokens=80, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, **kwargs)


@pytest.mark.parametrize("choice, tool", [("required", WEATHER), ({"type": "function", "function": {"name": "add"}}, ADD)])
def test_required_and_named_choices_always_call_valid_functions(client, choice, tool):
    out = _create(client, tools=[WEATHER, ADD], tool_choice=choice, parallel_tool_calls=False)
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and message.content is None
    assert len(message.tool_calls) == 1
    _valid(message.tool_calls[0], tool)


def test_required_choice_streamed_matches_whole(client):
    kwargs = dict(tools=[WEATHER, ADD], tool_choice="required", parallel_tool_calls=False)
    whole = _create(client, **kwargs).choices[0].message.tool_calls
    chunks = list(_create(client, stream=True, **kwargs))
    deltas = [call for c in chunks for call in c.choices[0].delta.tool_calls or ()]
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == \
        [(0, c.function.name, c.function.arguments) for c in whole]
    assert all(d.id and d.type == "function" for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)


def test_parallel_calls_each_validate(client):
    out = _create(client, tools=[WEATHER], tool_choice="required",
                  messages=[{"role": "user", "content": "Weather in Paris, Oslo and Rome?"}])
    calls = out.choices[0].message.tool_calls
    assert calls and len({c.id for c in calls}) == len(calls)
    for call in calls:
        _valid(call, WEATHER)


def test_auto_and_none_answer_in_text_when_the_model_does_not_call(client):
    for choice in ("auto", "none"):
        out = _create(client, tools=[WEATHER], tool_choice=choice, max_tokens=16)
        assert out.choices[0].message.content and not out.choices[0].message.tool_calls


def test_tool_results_reach_the_model(client, server):
    """A `tool` message answers the call: the prompt the model reads holds the result."""
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_7", "content": "18 C and sunny"}]
    out = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=24, temperature=0)
    assert out.choices[0].message.content
    ids = asyncio.run(server.app.state.server.chat_prompt([ChatMessage.model_validate(m) for m in history])).ids
    text = server.tokenizer.decode(ids, skip_special_tokens=False)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n18 C and sunny\n</tool_response>" in text


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "add"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, None),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, None),
])
def test_inconsistent_tool_requests_are_400(client, body, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, **body)
    if param is not None:
        assert caught.value.body["param"] == param


def test_langchain_bind_tools_and_a_two_step_agent_loop(server):
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    sent = []  # the bodies LangChain posts, as the server receives them
    http = httpx.Client(event_hooks={"request": [lambda request: sent.append(json.loads(request.read()))]})
    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key=KEY, model=MODEL, temperature=0, max_tokens=48,
                     max_retries=0, http_client=http)
    messages = [HumanMessage("What is 1234 + 4321? Use the add tool.")]
    step = llm.bind_tools([add], tool_choice="add").invoke(messages)
    (call,) = step.tool_calls
    assert call["name"] == "add" and set(call["args"]) == {"a", "b"}
    messages += [step, add.invoke(call)]  # the agent runs the function; its ToolMessage goes back
    answer = llm.bind_tools([add], tool_choice="none").invoke(messages)
    assert not answer.tool_calls and answer.content
    # The second turn's prompt holds the call and its result. (What a 135M model then writes is its
    # own business: asserting its greedy wording would test bf16 rounding, not the agent loop.)
    prompt = asyncio.run(server.app.state.server.chat_prompt(
        [ChatMessage.model_validate(m) for m in sent[-1]["messages"]])).ids
    text = server.tokenizer.decode(prompt, skip_special_tokens=False)
    assert f"<tool_response>\n{add.invoke(call['args'])}\n</tool_response>" in text
    assert '"name": "add"' in text


# -- OpenAI's Responses API -------------------------------------------------------------------------
FLAT_WEATHER = {"type": "function", **WEATHER["function"]}


def test_responses_text_is_the_chat_answer(client):
    chat = client.chat.completions.create(model=MODEL, max_tokens=20, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}])
    out = client.responses.create(model=MODEL, instructions="Be brief.", input="Name a colour.", max_output_tokens=20,
                                  temperature=0)
    assert out.output_text == chat.choices[0].message.content
    assert out.usage.input_tokens == chat.usage.prompt_tokens and out.usage.output_tokens == chat.usage.completion_tokens
    assert out.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")


def test_responses_streamed_events_build_the_same_response(client):
    kwargs = dict(model=MODEL, input=[{"role": "user", "content": [{"type": "input_text", "text": "Name a fruit."}]}],
                  max_output_tokens=16, temperature=0)
    client.responses.create(**kwargs)  # both below then find the prompt in the prefix cache: the same numerics
    whole = client.responses.create(**kwargs)
    with client.responses.stream(**kwargs) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert final.output_text == whole.output_text
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]


def test_responses_function_call_and_its_output(client):
    out = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[FLAT_WEATHER],
                                  tool_choice="required", parallel_tool_calls=False, max_output_tokens=60, temperature=0)
    (call,) = [item for item in out.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments).keys() == {"city"}
    answer = client.responses.create(model=MODEL, tools=[FLAT_WEATHER], max_output_tokens=16, temperature=0, input=[
        {"role": "user", "content": "Weather in Paris?"}, call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 C and sunny"}])
    assert answer.output_text


def test_responses_is_stateless(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_1")
    assert refused.value.body["param"] == "previous_response_id"


# -- Anthropic's Messages API -----------------------------------------------------------------------
GREEDY = {"temperature": 0}  # the SDK no longer takes sampling arguments; the API (and this server) still do


@pytest.fixture(scope="module")
def claude(server):
    import anthropic
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)


def test_messages_text_is_the_chat_answer(client, claude):
    chat = client.chat.completions.create(model=MODEL, max_tokens=20, extra_body=GREEDY, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}])
    out = claude.messages.create(model=MODEL, max_tokens=20, extra_body=GREEDY, system="Be brief.",
                                 messages=[{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}])
    assert out.content[0].type == "text" and out.content[0].text == chat.choices[0].message.content
    assert out.usage.input_tokens == chat.usage.prompt_tokens
    assert out.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[chat.choices[0].finish_reason]
    with claude.messages.stream(model=MODEL, max_tokens=20, extra_body=GREEDY, system="Be brief.",
                                messages=[{"role": "user", "content": "Name a colour."}]) as stream:
        final = stream.get_final_message()
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in out.content]
    assert (final.stop_reason, final.usage.input_tokens) == (out.stop_reason, out.usage.input_tokens)


def test_messages_stop_sequence(claude):
    free = claude.messages.create(model=MODEL, max_tokens=24, extra_body=GREEDY,
                                  messages=[{"role": "user", "content": "Count from one to ten in words."}])
    word = free.content[0].text.split()[1]
    out = claude.messages.create(model=MODEL, max_tokens=24, extra_body=GREEDY, stop_sequences=[word],
                                 messages=[{"role": "user", "content": "Count from one to ten in words."}])
    assert (out.stop_reason, out.stop_sequence) == ("stop_sequence", word)


@pytest.mark.parametrize("stream", [False, True])
def test_messages_tool_use_and_result(claude, stream):
    tool = {"name": "get_weather", "description": "The weather in a city",
            "input_schema": WEATHER["function"]["parameters"]}
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    kwargs = dict(model=MODEL, max_tokens=60, extra_body=GREEDY, tools=[tool],
                  tool_choice={"type": "any", "disable_parallel_tool_use": True})
    if stream:
        with claude.messages.stream(messages=ask, **kwargs) as events:
            out = events.get_final_message()
    else:
        out = claude.messages.create(messages=ask, **kwargs)
    (use,) = out.content
    assert use.type == "tool_use" and use.name == "get_weather" and set(use.input) == {"city"}
    assert out.stop_reason == "tool_use"
    answer = claude.messages.create(model=MODEL, max_tokens=16, extra_body=GREEDY, tools=[tool], messages=ask + [
        {"role": "assistant", "content": [use.model_dump(include={"type", "id", "name", "input"})]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C and sunny"}]}])
    assert answer.content[0].type == "text" and answer.content[0].text


def test_messages_errors_in_anthropic_shape(claude, server):
    import anthropic
    with pytest.raises(anthropic.BadRequestError) as image:
        claude.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    assert image.value.body == {"type": "error", "error": {"type": "invalid_request_error", "message":
                                "this model reads text only: a content block of type 'image' cannot be given to it"}}
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=MODEL, max_tokens=0, messages=[{"role": "user", "content": "Hi"}])
    import anthropic as sdk
    with pytest.raises(sdk.AuthenticationError):
        sdk.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Hi"}])


@pytest.mark.parametrize("route, body", [
    ("/v1/responses", {"model": MODEL, "input": "Hi", "max_output_tokens": 4}),
    ("/v1/messages", {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}),
])
def test_new_routes_keep_the_auth_body_and_limit_rules(server, route, body):
    import httpx
    with httpx.Client(base_url=server.url) as http:
        assert http.post(route, json=body).status_code == 401
        assert http.post(route, json=body, headers={"x-api-key": KEY}).status_code == 200
        keyed = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
        assert http.post(route, content=b"x" * (2**20 + 1), headers=keyed).status_code == 413
        too_many = {**body, "max_output_tokens": 257} if "input" in body else {**body, "max_tokens": 257}
        refused = http.post(route, json=too_many, headers=keyed)
        assert refused.status_code == 400 and "at most 256" in refused.text
        assert http.post(route, json={**body, "model": "other"}, headers=keyed).status_code == 404
