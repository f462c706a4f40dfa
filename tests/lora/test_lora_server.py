"""Multi-LoRA serving over HTTP: adapters picked by `model`, listed by /v1/models, mixed with base requests
in the same steps, loaded and unloaded at run time (only when the server allows it)."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from live_server import LiveServer
from pagedllm.config import LoRAConfig
from test_adapters import _prompt, make_peft_adapter

BASE = "tiny"


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    tiny = tiny_models["llama"]
    for name, seed in (("a", 1), ("b", 2)):
        make_peft_adapter(tiny, folder / name, seed=seed)
    return folder


@pytest.fixture(scope="module")
def server(tiny_models, adapters):
    lora = LoRAConfig(modules=(("a", str(adapters / "a")),), max_loras=2)
    with LiveServer(str(tiny_models["llama"].hf_dir), served_model_name=BASE, lora=lora, max_model_len=256,
                    block_size=4, allow_runtime_lora_updates=True) as live:
        yield live


def _complete(url: str, model: str, prompt: list[int]) -> list[int]:
    body = {"model": model, "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == model
    return response.json()["choices"][0]["token_ids"]


def test_adapters_by_model_name_mixed_with_the_base(server, adapters):
    models = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert [(m["id"], m.get("parent")) for m in models] == [(BASE, None), ("a", BASE)]
    loaded = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(adapters / "b")})
    assert loaded.status_code == 200 and loaded.json()["status"] == "loaded"
    prompt = _prompt(12, 1)
    alone = {model: _complete(server.url, model, prompt) for model in (BASE, "a", "b")}
    assert len({tuple(t) for t in alone.values()}) == 3
    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # all at once: they share batch steps
        futures = {pool.submit(_complete, server.url, model, prompt): model for model in (BASE, "a", "b") * 2}
        for future, model in futures.items():
            assert future.result() == alone[model], model
    chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True})
    assert chat.status_code == 200 and '"model":"b"' in chat.text.replace(" ", "")
    unloaded = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "b"})
    assert unloaded.status_code == 200
    gone = httpx.post(f"{server.url}/v1/completions", json={"model": "b", "prompt": "x", "max_tokens": 1})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def test_bad_loads_and_unloads_name_the_problem(server, adapters, tmp_path):
    post = lambda path, body: httpx.post(f"{server.url}{path}", json=body)  # noqa: E731
    missing = post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "nothing")})
    assert missing.status_code == 400 and "no such folder or file" in missing.json()["error"]["message"]
    twice = post("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(adapters / "a")})
    assert twice.status_code == 400 and "already loaded" in twice.json()["error"]["message"]
    base = post("/v1/load_lora_adapter", {"lora_name": BASE, "lora_path": str(adapters / "a")})
    assert base.status_code == 400
    assert post("/v1/unload_lora_adapter", {"lora_name": "nope"}).status_code == 404
    assert post("/v1/load_lora_adapter", {"lora_name": "x"}).status_code == 400  # no lora_path


def test_runtime_updates_are_off_unless_allowed(tiny_models, adapters):
    with LiveServer(str(tiny_models["llama"].hf_dir), served_model_name=BASE, lora=LoRAConfig(),
                    max_model_len=256) as live:
        refused = httpx.post(f"{live.url}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(adapters / "a")})
        assert refused.status_code == 403 and "--allow-runtime-lora-updates" in refused.json()["error"]["message"]
        assert [m["id"] for m in httpx.get(f"{live.url}/v1/models").json()["data"]] == [BASE]


def test_batch_rows_pick_adapters(tiny_models, adapters, tmp_path):
    import json

    from pagedllm import LLM, SamplingParams, infer

    tiny = tiny_models["llama"]
    rows = [{"prompt": _prompt(10, i), "max_tokens": 6, "lora": lora} for i, lora in enumerate(["a", None, "b", "a"])]
    rows.append({"prompt": [5, 6], "lora": "nope"})
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows))
    modules = {"a": str(adapters / "a"), "b": str(adapters / "b")}
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    infer(str(tiny.hf_dir), data, tmp_path / "out.jsonl", 1, sampling_params=greedy, progress=False,
          engine_options={"kv_cache_memory": 4 * 2**20, "lora_modules": modules})
    records = {r["line"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    llm = LLM(str(tiny.hf_dir), kv_cache_memory=4 * 2**20, lora_modules=modules)
    for line, row in enumerate(rows[:4], start=1):
        expected = llm.generate({"prompt_token_ids": row["prompt"]}, greedy, lora=row["lora"])[0].text
        assert records[line]["text"] == expected
    assert "no LoRA adapter named 'nope'" in records[5]["error"]


def test_a_lora_root_keeps_runtime_loads_inside_it(tiny_models, adapters, tmp_path):
    """--lora-root: paths are relative to it; a path outside, existing or not, or a symlink inside that
    points out, gets the same refusal before anything is read (no file's existence is told)."""
    (adapters / "escape").symlink_to(tmp_path)
    make_peft_adapter(tiny_models["llama"], tmp_path / "outside", seed=3)
    with LiveServer(str(tiny_models["llama"].hf_dir), served_model_name=BASE, lora=LoRAConfig(max_loras=2),
                    max_model_len=256, allow_runtime_lora_updates=True, lora_root=str(adapters)) as live:
        load = lambda name, path: httpx.post(f"{live.url}/v1/load_lora_adapter",  # noqa: E731
                                             json={"lora_name": name, "lora_path": path})
        assert load("b", "b").status_code == 200
        refusals = [load("x", path).json()["error"] for path in
                    (str(tmp_path / "outside"), "../outside", "/etc/shadow", "/no/such/file", "escape/outside")]
        assert {(e["message"], e["param"]) for e in refusals} == {
            ("lora_path must be inside the server's --lora-root", "lora_path")}
        assert load("a", str(adapters / "a")).status_code == 200  # an absolute path inside is fine
