"""schemathesis against the server's own OpenAPI schema (a bounded number of cases per route),
on the tiny random llama with a short context: no input may produce a 5xx or a traceback. A second suite
makes the generated bodies hostile (issue 34): a field or the whole body replaced by a lone surrogate, a
number past every range or not finite, nesting 100,000 deep, a long string, sent whole or chunked."""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from live_server import LiveServer

CASES_PER_ROUTE = 40


@pytest.fixture(scope="module")
def fuzzed_server(tiny_models):
    with LiveServer(str(tiny_models["llama"].gguf_path), served_model_name="tiny", max_model_len=128,
                    max_tokens_limit=8, kv_cache_memory=16 * 2**20, block_size=4) as live:
        yield live


def _operations(url: str) -> list:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def _served(case):
    """The second pass on the generation routes: random `model` names end in 404 and random prompts
    (empty, ids past the vocabulary) in 400 before generation, so the field is dropped and a completion
    prompt or embedding input made valid; every other field stays fuzzed."""
    if isinstance(case.body, dict):
        case.body.pop("model", None)
        if case.path == "/v1/completions":
            case.body["prompt"] = "river stone"
        if case.path == "/v1/embeddings":
            case.body["input"] = ["river stone", "mountain"]
            case.body.pop("dimensions", None)
        if case.path == "/v1/responses":
            case.body.update(input="river stone", max_output_tokens=4)
            case.body.pop("previous_response_id", None)
        if case.path == "/v1/inspect":
            case.body["prompt"] = "river stone"
            case.body.pop("messages", None)
        if case.path == "/v1/messages":
            case.body.update(messages=[{"role": "user", "content": "river stone"}], max_tokens=4)
    return case


GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/messages",
                     "/v1/inspect")


def test_no_input_gets_a_server_error(fuzzed_server):
    operations = _operations(fuzzed_server.url)
    assert {op.path for op in operations} >= {*GENERATION_ROUTES, "/tokenize"}
    statuses: dict[tuple[str, bool], list[int]] = {}
    passes = [(op, False) for op in operations] + [(op, True) for op in operations if op.path in GENERATION_ROUTES]
    for operation, served_model in passes:
        strategy = operation.as_strategy().map(_served) if served_model else operation.as_strategy()

        @given(case=strategy)
        @settings(max_examples=CASES_PER_ROUTE, deadline=None, suppress_health_check=list(HealthCheck),
                  derandomize=True, database=None)
        def check(case):
            response = case.call(timeout=60)
            statuses.setdefault((case.path, served_model), []).append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
            if response.status_code >= 400:  # OpenAI's error shape, or Anthropic's on /v1/messages
                assert "error" in response.json() and "Traceback" not in response.text

        check()
    for route in GENERATION_ROUTES:  # the fuzzer got past validation into generation on every route
        assert 200 in statuses[(route, True)], (route, statuses[(route, True)])
    assert fuzzed_server.idle()
    assert fuzzed_server.metrics_idle()


HOSTILE_CASES_PER_ROUTE = 25
# Written into the JSON text as they are: JSON that Python's json.dumps will not write (NaN, 100,000-deep
# nesting) or that no client library sends (a lone surrogate escape).
HOSTILE_JSON = ['"\\udfff"', '"a\\ud800b"', str(2**63), str(-2**63 - 1), "1" + "0" * 400, "1e999", "-1e999", "NaN",
                "Infinity", "5e-324", "[" * 100_000 + "]" * 100_000, '{"a":' * 20_000 + "1" + "}" * 20_000,
                '"' + "x" * 200_000 + '"', "[" + ",".join(["1"] * 50_000) + "]", "null", "true", "{}", "[]", "-1"]
_MARK = "\u0001hostile\u0001"


def _leaves(value, path=()):
    """Every place in a JSON body a value sits: object fields and list items, at any depth."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, (*path, index))


def _with_mark(body, path):
    if not path:
        return _MARK
    body = json.loads(json.dumps(body))
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = _MARK
    return body


@st.composite
def _hostile_bodies(draw, operation, served_model: bool):
    """A generated body with one place (a field, an item, or the whole body) replaced by hostile JSON."""
    case = draw(operation.as_strategy())
    if served_model:
        case = _served(case)
    places = list(_leaves(case.body)) if isinstance(case.body, (dict, list)) else [()]
    marked = _with_mark(case.body, draw(st.sampled_from(places)))
    text = json.dumps(marked).replace(json.dumps(_MARK), draw(st.sampled_from(HOSTILE_JSON)))
    return case.path, text.encode(), draw(st.booleans())


def _chunks(content: bytes):
    for start in range(0, len(content), 4096):
        yield content[start:start + 4096]


def test_hostile_bodies_get_no_server_error(fuzzed_server):
    """Every route with a JSON body, its generated cases made hostile, sent whole or chunked (no
    Content-Length): every answer is below 500 in the error shape; then the server serves a normal request
    and /metrics shows nothing running and the KV pool empty."""
    operations = [op for op in _operations(fuzzed_server.url) if op.method.upper() == "POST"]
    assert {op.path for op in operations} >= {*GENERATION_ROUTES, "/tokenize"}
    with httpx.Client(base_url=fuzzed_server.url, timeout=60) as http:
        for operation, served_model in [(op, op.path in GENERATION_ROUTES) for op in operations]:

            @given(sent=_hostile_bodies(operation, served_model))
            @settings(max_examples=HOSTILE_CASES_PER_ROUTE, deadline=None, suppress_health_check=list(HealthCheck),
                      derandomize=True, database=None)
            def check(sent):
                path, content, chunked = sent
                answer = http.post(path, content=_chunks(content) if chunked else content,
                                   headers={"Content-Type": "application/json"})
                assert answer.status_code < 500, (path, content[:300], answer.text[:500])
                if answer.status_code >= 400:
                    assert "error" in answer.json() and "Traceback" not in answer.text

            check()
        answer = http.post("/v1/completions", json={"prompt": "river stone", "max_tokens": 2})
        assert answer.status_code == 200, answer.text
    assert fuzzed_server.metrics_idle()
