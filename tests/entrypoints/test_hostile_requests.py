"""The hostile-input probe's reproductions (issue 34), against one live server on the tiny random llama:
each answer is a 4xx that names the field, and afterwards the server still serves and holds nothing."""

from __future__ import annotations

import json
import random
import socket

import httpx
import pytest

from live_server import LiveServer

KEY = "hostile-key"
HUGE = 2**63  # "Overflow when unpacking long long" in a tensor, once


@pytest.fixture(scope="module")
def server(tiny_models):
    with LiveServer(str(tiny_models["llama"].gguf_path), served_model_name="tiny", api_key=KEY, max_model_len=128,
                    max_tokens_limit=8, kv_cache_memory=16 * 2**20, block_size=4) as live:
        yield live


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client


def _chat(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "river stone"}], "max_tokens": 4, **fields}


def _still_serving(server, http) -> None:
    assert http.get("/health").status_code == 200
    answer = http.post("/v1/completions", json={"prompt": "river stone", "max_tokens": 2})
    assert answer.status_code == 200, answer.text
    assert server.idle() and server.metrics_idle()


def _refused(answer: httpx.Response, field: str) -> None:
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert field in error["message"], error
    assert "Traceback" not in answer.text


@pytest.mark.parametrize("field,value", [("top_k", HUGE), ("n", HUGE), ("max_tokens", HUGE), ("seed", 2**70),
                                         ("stop_token_ids", [HUGE]), ("logit_bias", {str(HUGE): 1}),
                                         ("temperature", 1e308 * 10), ("repetition_penalty", 1e-40)])
def test_numbers_out_of_range_are_refused(server, http, field, value):
    body = _chat(**{field: value}) if field != "temperature" else _chat()
    content = httpx.Request("POST", "/", json=body).content
    if field == "temperature":  # JSON has no infinity; Python's encoder writes one anyway, as hostile clients may
        content = content[:-1] + b', "temperature": Infinity}'
    answer = http.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    _still_serving(server, http)


def test_top_k_past_int64_on_every_generation_route(server, http):
    _refused(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "top_k": HUGE}), "top_k")
    _refused(http.post("/v1/chat/completions", json=_chat(top_k=HUGE)), "top_k")
    messages = {"model": "tiny", "max_tokens": 4, "top_k": HUGE, "messages": [{"role": "user", "content": "x"}]}
    assert http.post("/v1/messages", json=messages).status_code == 400
    _still_serving(server, http)


def test_stop_token_ids_past_the_vocabulary(server, http):
    _refused(http.post("/v1/chat/completions", json=_chat(stop_token_ids=[10**6], min_tokens=2)), "stop_token_ids")
    _still_serving(server, http)


def test_a_tiny_temperature_samples_greedily(http):
    greedy = http.post("/v1/chat/completions", json=_chat(temperature=0)).json()
    tiny = http.post("/v1/chat/completions", json=_chat(temperature=1e-45)).json()
    assert tiny["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]


LONE = "river \udfff stone"
SURROGATE_CASES = [
    ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": LONE}]), "messages.0.content"),
    ("/v1/completions", {"prompt": LONE, "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "model": LONE}, "model"),
    ("/tokenize", {"prompt": LONE}, "prompt"),
    ("/v1/embeddings", {"input": [LONE]}, "input.0"),
    ("/v1/responses", {"input": LONE, "max_output_tokens": 4}, "input"),
    ("/v1/messages", {"max_tokens": 4, "messages": [{"role": "user", "content": LONE}]}, "messages.0.content"),
    ("/v1/inspect", {"prompt": LONE}, "prompt"),
    ("/v1/chat/completions", _chat(chat_template_kwargs={"\ud800": 1}), "chat_template_kwargs"),
]


@pytest.mark.parametrize("path,body,field", SURROGATE_CASES)
def test_lone_surrogates_are_refused_by_name(server, http, path, body, field):
    content = json.dumps(body).encode()  # ASCII JSON: the surrogate travels as a \udfff escape
    _refused(http.post(path, content=content, headers={"Content-Type": "application/json"}), field)
    _still_serving(server, http)


def test_a_chunked_body_is_bounded_by_its_bytes(server):
    """Content-Length: 5 with Transfer-Encoding: chunked and 3 MB of chunks: 413, not 3 MB tokenised."""
    host, port = "127.0.0.1", server.port
    chunk = b'{"prompt": "' + b"a" * (3 * 2**20) + b'"}'
    request = (b"POST /tokenize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
               b"\r\nContent-Type: application/json\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n" +
               f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n0\r\n\r\n")
    with socket.create_connection((host, port), timeout=30) as conn:
        try:
            conn.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before the whole body is sent
        reply = conn.recv(4096)
    status = reply.split(b"\r\n", 1)[0]
    assert b" 413 " in status or b" 400 " in status, status  # h11 itself may refuse the conflicting headers


def test_chunked_bodies_without_a_length_are_served_within_the_bound(http):
    """Clients that stream their upload send no Content-Length: served, and cut off once past the limit."""
    def chunks(body: bytes):
        yield from (body[i:i + 1000] for i in range(0, len(body), 1000))

    small = json.dumps({"prompt": "river stone"}).encode()
    answer = http.post("/tokenize", content=chunks(small), headers={"Content-Type": "application/json"})
    assert answer.status_code == 200 and answer.json()["count"] > 0, answer.text
    large = json.dumps({"prompt": "a" * (3 * 2**20)}).encode()
    answer = http.post("/tokenize", content=chunks(large), headers={"Content-Type": "application/json"})
    assert answer.status_code == 413, answer.text


def test_schema_and_docs_need_the_key(server):
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert httpx.get(f"{server.url}{path}").status_code == 401, path
        assert httpx.get(f"{server.url}{path}", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200, path


def _ref_chain(depth: int) -> dict:
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(depth)}
    defs[f"d{depth}"] = {"type": "string"}
    return {"$ref": "#/$defs/d0", "$defs": defs}


LARK_CHAIN = "start: a0\n" + "\n".join(f"a{i}: a{i + 1}" for i in range(3000)) + '\na3000: "x"'


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", _chat(response_format={"type": "json_schema",
                                                    "json_schema": {"name": "deep", "schema": _ref_chain(1000)}})),
    ("/v1/chat/completions", _chat(structured_outputs={"grammar": LARK_CHAIN})),
    ("/v1/responses", {"input": "x", "max_output_tokens": 4,
                       "text": {"format": {"type": "json_schema", "name": "deep", "schema": _ref_chain(1000)}}}),
])
def test_grammars_too_deep_for_the_compiler_are_refused(server, http, path, body):
    """Each of these killed the process inside the grammar library's native code (a segmentation fault)."""
    answer = http.post(path, json=body)
    assert answer.status_code == 400 and "deep" in answer.text, answer.text
    _still_serving(server, http)


@pytest.mark.parametrize("structured", [{"json": {"$ref": "#"}}, {"grammar": "start: a\na: a"}])
def test_grammars_that_match_nothing_are_refused(server, http, structured):
    answer = http.post("/v1/chat/completions", json=_chat(structured_outputs=structured))
    assert answer.status_code == 400 and "matches no text" in answer.text, answer.text


def test_a_regex_error_says_what_is_wrong(http):
    answer = http.post("/v1/chat/completions", json=_chat(structured_outputs={"regex": "[a-"}))
    assert answer.status_code == 400
    message = answer.json()["error"]["message"]
    assert "\n" not in message and not message.rstrip().endswith("regex parse error:"), message


def test_invalid_json_is_named_as_such(http):
    answer = http.post("/v1/chat/completions", content=b'{"messages": [1,, 2]}',
                       headers={"Content-Type": "application/json"})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["message"].startswith("the request body is not valid JSON") and error["param"] is None, error


HOSTILE_VALUES = [2**63, -2**63, 2**64 + 1, 10**400, 1e308, -1e308, 5e-324, -0.0, "NaN", "Infinity", "\udfff",
                  "x" * 100_000, json.loads("[" * 500 + "]" * 500), {"$ref": "#"}, None, True, [], {}, -1, 0]
HOSTILE_FIELDS = ["n", "best_of", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p",
                  "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "seed", "stop",
                  "stop_token_ids", "logprobs", "top_logprobs", "prompt_logprobs", "response_format", "model",
                  "structured_outputs", "max_completion_tokens", "timeout", "tools", "tool_choice", "user",
                  "chat_template_kwargs", "probes", "stream_options", "ignore_eos", "skip_special_tokens"]
ROUTES = {"/v1/chat/completions": _chat(), "/v1/completions": {"prompt": "river stone", "max_tokens": 4},
          "/v1/messages": {"max_tokens": 4, "messages": [{"role": "user", "content": "river stone"}]},
          "/v1/responses": {"input": "river stone", "max_output_tokens": 4},
          "/v1/embeddings": {"input": "river stone"}, "/tokenize": {"prompt": "river stone"}}


def test_hostile_fields_on_every_generation_route(server, http):
    """The reproductions, grown: 120 seeded bodies, each with 1-3 fields set to hostile values, on every
    generation route. No answer is a 5xx; afterwards the server serves and holds nothing."""
    rng = random.Random(34)
    for _ in range(120):
        path = rng.choice(sorted(ROUTES))
        body = dict(ROUTES[path])
        for field in rng.sample(HOSTILE_FIELDS, rng.randint(1, 3)):
            value = rng.choice(HOSTILE_VALUES)
            body[field] = {str(2**63): value} if field == "logit_bias" and rng.random() < 0.5 else value
        content = json.dumps(body).replace('"NaN"', "NaN").replace('"Infinity"', "Infinity").encode()
        answer = http.post(path, content=content, headers={"Content-Type": "application/json"})
        assert answer.status_code < 500, (path, body.keys(), answer.text[:300])
    _still_serving(server, http)
