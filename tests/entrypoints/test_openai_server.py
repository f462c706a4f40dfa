"""The server through the clients people use: the official `openai` package and LangChain's
ChatOpenAI, against a live server on 127.0.0.1 serving the default model."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from helpers import prefill_hidden
from live_server import LiveServer

KEY, MODEL = "sk-test", "smollm"
MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Name a fruit."}]


@pytest.fixture(scope="module")
def server():
    with LiveServer(served_model_name=MODEL, api_key=KEY, max_model_len=512, max_tokens_limit=256) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def test_completion_streamed_and_not(client):
    full = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    assert full.usage.completion_tokens == 12 and full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens > 0 and full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason


def test_chat_streamed_and_not(client):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    assert text and full.choices[0].message.role == "assistant" and full.usage.completion_tokens > 0
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_n_and_seed(client):
    out = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, n=3, seed=4,
                                    temperature=1.0)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    again = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, n=3, seed=4,
                                      temperature=1.0)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, n=2, temperature=0.8)
    assert sorted(c.index for c in chat.choices) == [0, 1] and chat.usage.completion_tokens <= 16


def test_logprobs(client):
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert content[0].top_logprobs[0].logprob == content[0].logprob  # greedy: the chosen token is the top one
    legacy = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=5, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == legacy.choices[0].text and lp.text_offset[0] == 0


def test_json_schema_response_format(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    out = client.chat.completions.create(
        model=MODEL, max_tokens=60, temperature=0,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    person = json.loads(out.choices[0].message.content)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)


def test_langchain_chat_openai(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key=KEY, model=MODEL, temperature=0, max_tokens=20,
                     max_retries=0)
    answer = llm.invoke("What is two plus two?")
    assert answer.content
    streamed = "".join(chunk.content for chunk in llm.stream("What is two plus two?"))
    assert streamed == answer.content


def test_errors_have_openai_shape(server, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, top_p=3.0)
    assert bad.value.body["param"] == "top_p"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=MODEL, prompt="word " * 300, max_tokens=250)
    assert long.value.body["code"] == "context_length_exceeded"
    assert long.value.body["param"] == "prompt"
    message = long.value.body["message"]
    assert "512" in message and "250 in the completion" in message and "in the prompt" in message


def test_http_level_errors_never_show_a_traceback(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, headers=headers) as http:
        too_big = http.post("/v1/completions", content=b"x" * (2**20 + 1), headers={"content-type": "application/json"})
        assert too_big.status_code == 413 and "error" in too_big.json()
        broken = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert broken.status_code == 400 and "Traceback" not in broken.text
        wrong_type = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "robot"}]})
        assert wrong_type.status_code == 400 and wrong_type.json()["error"]["param"].startswith("messages")
        assert http.get("/no/such/route").status_code == 404


def test_tokenize_models_health_metrics(server, client):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, headers=headers) as http:
        tokens = http.post("/tokenize", json={"prompt": "Hello world"}).json()
        assert tokens["count"] == len(tokens["tokens"]) > 0
        text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
        assert text.endswith("Hello world")
        assert http.post("/detokenize", json={"tokens": [-1]}).status_code == 400
        assert http.get("/health").status_code == 200
        metrics = http.get("/metrics").text
    assert [m.id for m in client.models.list().data] == [MODEL]
    for name in ("pagedllm:num_requests_running", "pagedllm:num_requests_waiting", "pagedllm:kv_cache_usage_perc",
                 "pagedllm:prefix_cache_hit_rate", "pagedllm:prompt_tokens_total", "pagedllm:generation_tokens_total",
                 "pagedllm:time_to_first_token_seconds_bucket", "pagedllm:time_per_output_token_seconds_bucket"):
        assert name in metrics


def test_non_streaming_client_that_leaves_aborts_its_request(server):
    async_engine = server.app.state.server.client
    before = async_engine.num_aborted
    body = {"model": MODEL, "prompt": "Count slowly:", "max_tokens": 250, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=1.0)
    deadline = time.monotonic() + 10
    while async_engine.num_aborted == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert async_engine.num_aborted == before + 1
    assert server.idle()


def test_full_queue_answers_503(tiny_models):
    with LiveServer(str(tiny_models["llama"].gguf_path), max_num_seqs=1, max_waiting_requests=1) as live:
        body = {"prompt": "hello", "max_tokens": 200, "ignore_eos": True, "temperature": 0}
        with httpx.Client(base_url=live.url, timeout=60) as http:
            import concurrent.futures
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                codes = list(pool.map(lambda _: http.post("/v1/completions", json=body).status_code, range(8)))
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}


def test_default_max_tokens_keep_within_the_server_limits(tiny_models):
    """Completions without max_tokens get OpenAI's 16, or less where --max-tokens-limit or the context
    leaves less; chat gets what the context leaves, within the limit. Only explicit values are refused."""
    with LiveServer(str(tiny_models["llama"].gguf_path), max_tokens_limit=8, max_model_len=64) as live, \
            httpx.Client(base_url=live.url, timeout=60) as http:
        def completion_tokens(route: str, body: dict) -> int:
            response = http.post(route, json={**body, "ignore_eos": True, "temperature": 0})
            assert response.status_code == 200, response.text
            return response.json()["usage"]["completion_tokens"]

        assert completion_tokens("/v1/completions", {"prompt": "river stone"}) == 8
        assert completion_tokens("/v1/completions", {"prompt": [5] * 60}) == 4  # the context leaves 4
        assert completion_tokens("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}) == 8
        refused = http.post("/v1/completions", json={"prompt": "river", "max_tokens": 9})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"


def test_echo_scores_the_prompt(client):
    """lm-eval's loglikelihood request: echo + logprobs + max_tokens 0 gives the prompt's token logprobs,
    the first one null. Scoring a greedy continuation gives back the logprobs it was generated with
    (prefill and decode take different kernels here, so within a small tolerance)."""
    prompt = "1, 2, 3, 4,"
    generated = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=1)
    text = prompt + generated.choices[0].text
    scored = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=1)
    choice = scored.choices[0]
    lp = choice.logprobs
    assert choice.text == text and scored.usage.completion_tokens == 0
    assert len(lp.tokens) == scored.usage.prompt_tokens and "".join(lp.tokens) == text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and lp.text_offset == sorted(lp.text_offset)
    assert lp.tokens[-4:] == generated.choices[0].logprobs.tokens
    for ours, theirs in zip(lp.token_logprobs[-4:], generated.choices[0].logprobs.token_logprobs):
        assert abs(ours - theirs) < 0.15
    continued = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True)
    assert continued.choices[0].text == text and continued.usage.completion_tokens == 4
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                            logprobs=1, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    streamed = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    assert "".join(streamed) == text and chunks[0].choices[0].logprobs.token_logprobs[0] is None


def test_requests_the_model_cannot_serve_are_named(client):
    with pytest.raises(openai.BadRequestError) as no_tokens:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=0)
    assert no_tokens.value.body["param"] == "max_tokens" and "echo" in no_tokens.value.body["message"]
    with pytest.raises(openai.BadRequestError) as fim:
        client.completions.create(model=MODEL, prompt="def add(a, b):", suffix="    return c", max_tokens=4)
    assert fim.value.body["param"] == "suffix" and "FIM" in fim.value.body["message"]
    with pytest.raises(openai.BadRequestError) as bias:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, logit_bias={"999999": 5})
    assert "999999" in bias.value.body["message"] and bias.value.body["param"] == "logit_bias"
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError) as picture:
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}])
    assert "text only" in picture.value.body["message"] and picture.value.body["param"] == "messages"
    parts = client.chat.completions.create(model=MODEL, max_tokens=2, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]}])
    assert parts.choices[0].message.content


def test_embeddings(server, client):
    """Batched through the engine, L2-normalised, float or base64 (the client's default), the same vector
    alone or in a batch, and the final hidden state of the prompt's last token as the model computes it."""
    import numpy as np
    import torch

    texts = ["The cat sat on the mat.", "A kitten rested on the rug.", "Interest rates rose in March."]
    batch = client.embeddings.create(model=MODEL, input=texts)  # the client asks for base64 and decodes it
    vectors = np.array([d.embedding for d in batch.data])
    assert [d.index for d in batch.data] == [0, 1, 2] and vectors.shape == (3, 576)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert batch.usage.prompt_tokens == batch.usage.total_tokens > 10
    alone = client.embeddings.create(model=MODEL, input=texts[0], encoding_format="float").data[0].embedding
    assert float(np.dot(alone, vectors[0])) > 0.999
    ids = server.tokenizer.encode(texts[2])
    by_ids = client.embeddings.create(model=MODEL, input=ids, encoding_format="float").data[0].embedding
    assert float(np.dot(by_ids, vectors[2])) > 0.999
    reference = torch.nn.functional.normalize(prefill_hidden(server.reference.model, ids)[-1], dim=0).numpy()
    assert float(np.dot(reference, vectors[2])) > 0.99
    with pytest.raises(openai.BadRequestError) as dims:
        client.embeddings.create(model=MODEL, input="hi", dimensions=64)
    assert dims.value.body["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError) as empty:
        client.embeddings.create(model=MODEL, input=[])
    assert empty.value.body["param"] == "input"


def test_embedding_task_serves_embeddings_only(tiny_models):
    with LiveServer(str(tiny_models["llama"].gguf_path), task="embed", pooling="mean") as live, \
            httpx.Client(base_url=live.url, timeout=60) as http:
        out = http.post("/v1/embeddings", json={"input": ["river stone", "mountain"]})
        assert out.status_code == 200 and len(out.json()["data"]) == 2
        refused = http.post("/v1/completions", json={"prompt": "river", "max_tokens": 2})
        assert refused.status_code == 400 and "/v1/embeddings" in refused.json()["error"]["message"]


def test_reasoning_kept_apart_from_the_answer():
    """The default model does not reason, so its output is made thinking-shaped with vLLM's
    structured_outputs regex; the server (--reasoning-parser think) splits it, whole and streamed.
    chat_template_kwargs may not replace the server's own template variables."""
    thinking = {"regex": r"<think>[a-z]{2,8}( [a-z]{2,8}){1,3}</think>\n[A-Z][a-z]{2,8}( [a-z]{2,8}){0,3}\."}
    with LiveServer(reasoning_parser="think", served_model_name=MODEL) as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0)
        ask = dict(model=MODEL, messages=[{"role": "user", "content": "Is the sky blue?"}], max_tokens=40,
                   temperature=0, extra_body={"structured_outputs": thinking})
        # Both compared requests then find the prompt in the prefix cache and prefill the same rows: a
        # cold prompt is one many-row chunk (bfloat16 GEMMs and attention), a warm one a few rows (int8
        # products, float32 attention), which can tip this near-tied constrained text another way.
        client.chat.completions.create(**ask)
        message = client.chat.completions.create(**ask).choices[0].message
        reasoning = message.model_extra["reasoning_content"]
        assert reasoning and "<think>" not in reasoning and " " in reasoning
        assert message.content and "think>" not in message.content and message.content.endswith(".")
        chunks = list(client.chat.completions.create(**ask, stream=True))
        deltas = [c.choices[0].delta for c in chunks]
        assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == reasoning
        assert "".join(d.content or "" for d in deltas) == message.content
        with pytest.raises(openai.BadRequestError) as reserved:
            client.chat.completions.create(**{**ask, "extra_body": {"chat_template_kwargs": {"messages": []}}})
        assert reserved.value.body["param"] == "chat_template_kwargs"
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(**{**ask, "extra_body": {"structured_outputs": {"ebnf": "x"}}})
        assert bad.value.body["param"] == "structured_outputs"
        with pytest.raises(openai.BadRequestError, match="structured output"):  # a Lark grammar that is not one
            client.chat.completions.create(**{**ask, "extra_body": {"structured_outputs": {"grammar": "x"}}})


def test_engine_state_shows_the_batch_job_board(server):
    import os

    from pagedllm.entrypoints.batch.board import JobBoard, JobState

    JobBoard().publish(JobState(os.getpid(), "rows.jsonl", "answers.jsonl", 2, rows=100, done=40, state="running",
                                rows_per_s=2.5, started_at=time.time()))
    assert httpx.get(f"{server.url}/v1/engine").status_code == 401
    state = httpx.get(f"{server.url}/v1/engine", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert state["object"] == "engine" and set(state["blocks"]) <= set("ucf") and isinstance(state["running"], list)
    [job] = [j for j in state["batch_jobs"] if j["pid"] == os.getpid()]
    assert (job["input"], job["output"], job["state"], job["done"], job["rows"]) == \
        ("rows.jsonl", "answers.jsonl", "running", 40, 100)
