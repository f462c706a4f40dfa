"""Malformed and hostile model files: a clear error naming the problem, fast, with no huge allocation."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import tracemalloc

import pytest

from pagedllm.errors import PagedLLMError
from pagedllm.models.loaders import ModelSource, load_model, read_model_config, resolve_model
from pagedllm.models.loaders.gguf_file import GGUFError, GGUFFile
from pagedllm.models.registry import UnsupportedModelError


def _string(s: str) -> bytes:
    data = s.encode()
    return struct.pack("<Q", len(data)) + data


def _header(n_tensors: int, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


def _kv_string(key: str, value: str) -> bytes:
    return _string(key) + struct.pack("<I", 8) + _string(value)


def _expect_error(path, fragment: str) -> str:
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError) as info:
            GGUFFile(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"{peak} bytes allocated to reject a bad file"
    message = str(info.value)
    assert fragment in message and str(path) in message
    return message


@pytest.mark.parametrize("cut", [10, 30, 1_000, 200_000, 5_000_000, 90_000_000])
def test_truncated_default_model(tmp_path, default_gguf, cut):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(default_gguf.read_bytes()[:cut])
    _expect_error(bad, "not a GGUF file" if cut < 24 else "truncated")


def test_wrong_magic(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGML" + bytes(100))
    _expect_error(bad, "magic")


@pytest.mark.parametrize("n_tensors,n_kv", [(2**40, 0), (0, 2**40), (2**63, 2**63)])
def test_header_counts_claiming_terabytes(tmp_path, n_tensors, n_kv):
    bad = tmp_path / "huge.gguf"
    bad.write_bytes(_header(n_tensors, n_kv) + bytes(64))
    _expect_error(bad, "more than the file holds")


def test_string_length_claiming_terabytes(tmp_path):
    bad = tmp_path / "s.gguf"
    bad.write_bytes(_header(0, 1) + struct.pack("<Q", 2**45) + b"key")
    _expect_error(bad, "a metadata key of 35184372088832 bytes")


def test_array_count_claiming_terabytes(tmp_path):
    bad = tmp_path / "a.gguf"
    body = _string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**50)
    bad.write_bytes(_header(0, 1) + body + bytes(64))
    _expect_error(bad, "more than the file can hold")
    bad.write_bytes(_header(0, 1) + _string("scores") + struct.pack("<IIQ", 9, 6, 2**50) + bytes(64))
    _expect_error(bad, "truncated")


def test_tensor_beyond_end_of_file(tmp_path):
    bad = tmp_path / "t.gguf"
    info = _string("token_embd.weight") + struct.pack("<IQQIQ", 2, 64, 64, 0, 0)  # 16 KiB of F32
    bad.write_bytes(_header(1, 1) + _kv_string("general.architecture", "llama") + info + bytes(64))
    _expect_error(bad, "truncated or corrupt")


def test_unknown_architecture(tmp_path):
    bad = tmp_path / "rwkv.gguf"
    bad.write_bytes(_header(0, 1) + _kv_string("general.architecture", "rwkv6") + bytes(32))
    from pagedllm.models.registry import FAMILIES

    supported = ", ".join(sorted({a for f in FAMILIES for a in f.gguf_architectures}))
    assert {"gemma3", "llama", "phi3", "qwen3", "qwen2moe", "qwen3moe"} <= set(supported.split(", "))
    with pytest.raises(UnsupportedModelError, match=f"'rwkv6'.*supports: {supported}$"):
        read_model_config(ModelSource("gguf", bad))


def test_unknown_hf_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        read_model_config(resolve_model(tmp_path))


def test_bad_hf_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(PagedLLMError, match="cannot read JSON"):
        read_model_config(resolve_model(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8}))
    with pytest.raises(PagedLLMError, match="missing key"):
        read_model_config(resolve_model(tmp_path))


def test_missing_model_file():
    with pytest.raises(PagedLLMError, match="no such file"):
        resolve_model("/no/such/model.gguf")


def test_weights_that_do_not_fit(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    folder.mkdir()
    src = tiny_models["llama"].hf_dir
    (folder / "config.json").write_text((src / "config.json").read_text())
    weights = load_file(src / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(PagedLLMError, match="missing tensor.*layers.1.mlp"):
        load_model(resolve_model(folder))


@pytest.mark.parametrize("argv", [["generate", "hi", "--model", "{bad}"], ["memory", "{bad}"]])
def test_cli_reports_one_line_without_traceback(tmp_path, argv):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(8))
    argv = [a.replace("{bad}", str(bad)) for a in argv]
    result = subprocess.run([sys.executable, "-m", "pagedllm.entrypoints.cli", *argv], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("pagedllm: error: ") and "bad.gguf" in result.stderr
    assert result.stderr.count("\n") == 1


def test_repo_id_offline_is_one_clear_line(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # The hub reads HF_HUB_OFFLINE at import, which may already have happened: set both.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PagedLLMError, match="cannot download 'no-such-org/no-such-model'") as info:
        resolve_model("no-such-org/no-such-model")
    assert "\n" not in str(info.value)


def test_deeply_nested_arrays(tmp_path):
    bad = tmp_path / "nested.gguf"
    nesting = struct.pack("<IQ", 9, 1) * 5000  # array of array of array ...
    bad.write_bytes(_header(0, 1) + _string("deep") + struct.pack("<I", 9) + nesting + bytes(64))
    _expect_error(bad, "nests arrays")


def test_impossible_hyperparameters(tmp_path):
    bad = tmp_path / "zero.gguf"
    kvs = [_kv_string("general.architecture", "llama")] + [
        _string(f"llama.{k}") + struct.pack("<II", 4, v) for k, v in
        [("embedding_length", 64), ("attention.head_count", 0), ("feed_forward_length", 8), ("block_count", 1)]]
    info = _string("token_embd.weight") + struct.pack("<IQQIQ", 2, 64, 4, 0, 0)
    bad.write_bytes(_header(1, len(kvs)) + b"".join(kvs) + info + bytes(32 + 64 * 4 * 4))
    with pytest.raises(PagedLLMError, match="head"):
        read_model_config(ModelSource("gguf", bad))


def _llama_file(path, ints: dict, floats: dict | None = None, blocks: int = 1):
    """A llama-shaped GGUF holding token_embd and `blocks` blocks' norms, with these metadata values."""
    kvs = [_kv_string("general.architecture", "llama")]
    kvs += [_string(f"llama.{k}") + struct.pack("<IQ", 10, v) for k, v in ints.items()]  # uint64
    kvs += [_string(f"llama.{k}") + struct.pack("<If", 6, v) for k, v in (floats or {}).items()]  # float32
    names = ["token_embd.weight"] + [f"blk.{i}.attn_norm.weight" for i in range(blocks)]
    infos = _string(names[0]) + struct.pack("<IQQIQ", 2, 64, 4, 0, 0)
    infos += b"".join(_string(n) + struct.pack("<IQIQ", 1, 64, 0, 64 * 4 * 4 + 256 * i) for i, n in enumerate(names[1:]))
    path.write_bytes(_header(len(names), len(kvs)) + b"".join(kvs) + infos + bytes(32 + 64 * 4 * 4 + 256 * blocks))
    return ModelSource("gguf", path)


SHAPE = {"embedding_length": 64, "attention.head_count": 4, "feed_forward_length": 8, "block_count": 1}


def test_block_count_past_the_file(tmp_path):
    """2^32 - 1 blocks built ~9 GB of empty layers before any tensor was read."""
    source = _llama_file(tmp_path / "blocks.gguf", {**SHAPE, "block_count": 2**32 - 1})
    tracemalloc.start()
    try:
        with pytest.raises(PagedLLMError, match="block_count is 4294967295, but the file holds tensors of 1 block"):
            read_model_config(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20


@pytest.mark.parametrize("key,value", [("rope.freq_base", float("nan")), ("rope.freq_base", 0.0),
                                       ("rope.freq_base", float("inf")),
                                       ("attention.layer_norm_rms_epsilon", float("nan")),
                                       ("attention.layer_norm_rms_epsilon", -1.0)])
def test_non_finite_or_impossible_floats(tmp_path, key, value):
    source = _llama_file(tmp_path / "f.gguf", SHAPE, {key: value})
    with pytest.raises(PagedLLMError, match="finite"):
        read_model_config(source)


def test_heads_that_do_not_divide_the_embedding_say_so(tmp_path):
    source = _llama_file(tmp_path / "h.gguf", {**SHAPE, "attention.head_count": 7})
    with pytest.raises(PagedLLMError, match="head_count 7 does not divide embedding_length 64"):
        read_model_config(source)


def test_dimensions_whose_product_wraps_int64(tmp_path):
    """2^32 × 2^32 wrapped to 0 bytes in an int64 product, passed the size check, then asked for 1.4 TB."""
    bad = tmp_path / "wrap.gguf"
    info = _string("token_embd.weight") + struct.pack("<IQQQIQ", 3, 2**32, 2**32, 2**32, 0, 0)
    bad.write_bytes(_header(1, 0) + info + bytes(64))
    _expect_error(bad, "token_embd.weight")


def test_a_tensor_name_of_a_million_bytes_is_not_echoed(tmp_path):
    bad = tmp_path / "name.gguf"
    bad.write_bytes(_header(1, 0) + struct.pack("<Q", 10**6) + b"n" * 10**6 + bytes(64))
    message = _expect_error(bad, "tensor name of 1000000 bytes")
    assert len(message) < 300


def test_mutated_headers_fail_cleanly(tiny_models, tmp_path):
    """Generated hostile GGUF files: the tiny llama's header with 1-8 bytes overwritten, 150 seeded times.
    Each is read as a model config or refused with a PagedLLMError naming the file: never another
    exception, never a hang. (One copy of the file, its header rewritten in place each time, with a
    modification time of its own: parsed files are cached by path, mtime and size.)"""
    import os
    import random
    import shutil
    import time

    source = tiny_models["llama"].gguf_path
    header_end = GGUFFile(source).tensors["token_embd.weight"].offset
    header = source.read_bytes()[:header_end]
    path = tmp_path / "mutated.gguf"
    shutil.copyfile(source, path)
    rng = random.Random(34)
    started, refused = time.monotonic(), 0
    for i in range(150):  # each parse reads the 49,152-token vocabulary: ~65 ms
        data = bytearray(header)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(header_end)] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        with open(path, "r+b") as f:
            f.write(data)
        os.utime(path, ns=(10**9 * (i + 1), 10**9 * (i + 1)))
        try:
            read_model_config(ModelSource("gguf", path))
        except PagedLLMError as exc:
            refused += 1
            assert str(path) in str(exc) and len(str(exc)) < 1000, exc
    assert refused > 0 and time.monotonic() - started < 120
