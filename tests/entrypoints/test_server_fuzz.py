"""schemathesis against the server's own OpenAPI schema (a bounded number of cases per route),
on the tiny random llama with a short context: no input may produce a 5xx or a traceback."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

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
