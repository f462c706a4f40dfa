"""Probes on the serving model: POST /v1/inspect, and the `probes` field of (chat) completions, against a
live server on 127.0.0.1 serving the default model while other requests run."""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest

from live_server import LiveServer
from pagedllm.tools.inspect import inspect_model

KEY, MODEL = "sk-probe", "smollm"
HEADERS = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def server():
    with LiveServer(served_model_name=MODEL, api_key=KEY, max_model_len=1024, max_tokens_limit=128) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def _post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", json=body, headers=HEADERS, timeout=120)


def test_inspect_route_is_the_probe_api(server):
    body = {"model": MODEL, "prompt": "The capital of France is", "layers": [0, 29], "top_k": 3,
            "attention": ["29:0:-1"]}
    result = _post(server, "/v1/inspect", body).json()
    assert result["object"] == "inspection" and result["model"] == MODEL
    ids = server.tokenizer.encode("The capital of France is")
    assert result["token_ids"] == ids and "".join(result["tokens"]) == "The capital of France is"
    expected = inspect_model(server.reference.model, ids, [0, 29], 3, attention=["29:0:-1"]).as_json()
    assert [layer["layer"] for layer in result["layers"]] == [0, 29]
    for got, want in zip(result["layers"], expected["layers"]):
        assert got["top_k"] == want["top_k"] and got["cos_distance"] == pytest.approx(want["cos_distance"])
    assert result["attention"][0]["queries"] == [len(ids) - 1]
    assert sum(result["attention"][0]["weights"][0][0]) == pytest.approx(1, abs=1e-5)
    chat = _post(server, "/v1/inspect", {"messages": MESSAGES, "top_k": 2}).json()
    assert chat["token_ids"] == server.tokenizer.encode_chat(MESSAGES)
    assert len(chat["layers"]) == server.reference.model.config.num_hidden_layers


def _chat(client, probes: dict | None, max_tokens: int | None = 24, **options):
    extra = {"probes": probes} if probes else None
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=max_tokens or 96,
                                          extra_body=extra, **options)


def test_probes_never_change_the_tokens(server, client):
    greedy, seeded = dict(temperature=0), dict(temperature=0.9, seed=7)
    probes = {"layers": [5, 20], "top_k": 4, "attention": ["3:1"]}
    # Warm first: a prompt whose prefix is cached computes its first token apart from the rest (in other
    # kernels, so near-tie tokens may differ between a cold and a warm run, probes or not).
    _chat(client, None, **greedy)
    for options in (greedy, seeded):
        plain, probed = _chat(client, None, **options), _chat(client, probes, **options)
        assert plain.choices[0].message.content == probed.choices[0].message.content
        assert "probes" not in (plain.model_extra or {})
    result = probed.model_extra["probes"]
    expected = _post(server, "/v1/inspect", {"messages": MESSAGES, **probes}).json()
    assert result["token_ids"] == expected["token_ids"] and result["layers"] == expected["layers"]
    assert result["attention"] == expected["attention"]


def test_probes_taken_while_a_request_decodes_leave_it_alone(server, client):
    """Probes run between engine steps on a cache of their own: a request decoding meanwhile (alone in its
    batch either way) yields the same tokens as with no probes about."""
    alone = _chat(client, None, temperature=0, max_tokens=None).choices[0].message.content
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        decoding = pool.submit(_chat, client, None, temperature=0, max_tokens=None)
        probed = [_post(server, "/v1/inspect", {"prompt": f"Probe number {i}", "attention": ["0"]}) for i in range(6)]
        assert decoding.result().choices[0].message.content == alone
    assert all(r.status_code == 200 for r in probed)


def test_streamed_probes_come_in_a_last_chunk(client):
    whole = _chat(client, {"layers": [0]}, temperature=0)
    chunks = list(_chat(client, {"layers": [0]}, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].model_extra["probes"] == whole.model_extra["probes"]


def test_completions_carry_one_probe_result_per_prompt(server):
    body = {"model": MODEL, "prompt": ["Once upon a time", "1, 2, 3,"], "max_tokens": 8, "temperature": 0}
    plain = _post(server, "/v1/completions", body).json()
    probed = _post(server, "/v1/completions", {**body, "probes": {"layers": [29], "top_k": 1}}).json()
    assert [c["text"] for c in plain["choices"]] == [c["text"] for c in probed["choices"]]
    assert [p["token_ids"] for p in probed["probes"]] == [server.tokenizer.encode(t) for t in body["prompt"]]
    # The last layer's lens at the prompt's end is the model's own first greedy token.
    firsts = [server.tokenizer.encode(c["text"])[0] for c in probed["choices"]]
    assert [p["layers"][0]["top_k"][0][0] for p in probed["probes"]] == firsts


@pytest.mark.parametrize("route, body, message", [
    ("/v1/inspect", {"prompt": "hi", "layers": [30]}, "layers: this model has layers 0..29"),
    ("/v1/inspect", {"prompt": "hi", "attention": ["1:x"]}, "expected LAYER[:HEAD[:QUERY[:KEY]]]"),
    ("/v1/inspect", {"prompt": "hi", "attention": ["1:0:5"]}, "query token 5 is out of range"),
    ("/v1/inspect", {"prompt": "hi", "messages": MESSAGES}, "exactly one of prompt and messages"),
    ("/v1/inspect", {"prompt": []}, "must not be empty"),
    ("/v1/inspect", {"prompt": "hi", "top_k": 0}, "top_k"),
    ("/v1/chat/completions", {"messages": MESSAGES, "probes": {"layers": [-1]}}, "layers"),
    ("/v1/completions", {"prompt": "hi", "probes": {"attention": ["0:99"]}}, "head 99 is out of range"),
])
def test_bad_probes_are_400s_that_name_the_problem(server, route, body, message):
    response = _post(server, route, body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_inspect_needs_the_key_and_the_served_model(server):
    assert httpx.post(f"{server.url}/v1/inspect", json={"prompt": "hi"}).status_code == 401
    assert _post(server, "/v1/inspect", {"prompt": "hi", "model": "other"}).status_code == 404
