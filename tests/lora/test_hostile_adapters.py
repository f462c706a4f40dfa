"""Hostile adapter files (issue 34): each is refused with a LoRAError that names the file and never quotes
its bytes, in bounded time and memory; the engine goes on serving."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedllm import LLM, SamplingParams
from pagedllm.lora import LoRAError

from test_adapters import make_peft_adapter

SECRET = "root:x:0:0:secret-line:" * 4  # /etc/shadow's first bytes, say


@pytest.fixture(scope="module")
def good(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    make_peft_adapter(tiny_models["llama"], folder, seed=1)
    return folder


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(str(tiny_models["llama"].hf_dir), kv_cache_memory=4 * 2**20, block_size=4, enable_lora=True)


def _copy(good, tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(good, folder)
    return folder


def _weights(folder):
    return folder / "adapter_model.safetensors"


def _config(folder) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def _header_of_2_62(folder):
    _weights(folder).write_bytes((2**62).to_bytes(8, "little") + b"{}" + b"\0" * 64)


def _truncated(folder):
    data = _weights(folder).read_bytes()
    _weights(folder).write_bytes(data[:len(data) // 2])


def _lying_shapes(folder):
    data = _weights(folder).read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [s * 64 for s in header[name]["shape"]]
    raw = json.dumps(header).encode()
    _weights(folder).write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + length:])


def _pickle(folder):
    torch.save({"base_model.model.x.lora_A.weight": torch.zeros(2, 2)}, _weights(folder))


def _nested_config(folder):
    (folder / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)


def _config_from_dev_zero(folder):
    (folder / "adapter_config.json").unlink()
    os.symlink("/dev/zero", folder / "adapter_config.json")


def _nan_alpha(folder):
    config = _config(folder)
    config["lora_alpha"] = float("nan")
    (folder / "adapter_config.json").write_text(json.dumps(config))  # Python writes NaN, as a hostile file may


def _nan_weights(folder):
    tensors = load_file(_weights(folder))
    name = next(iter(tensors))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, _weights(folder))


def _redos_pattern(folder):
    config = _config(folder)
    config["alpha_pattern"] = {"(a|a)*(x+x+)+y": 4}
    (folder / "adapter_config.json").write_text(json.dumps(config))


CASES = {
    "header_of_2_62": (_header_of_2_62, "header length"),
    "truncated": (_truncated, "safetensors"),
    "lying_shapes": (_lying_shapes, "safetensors"),
    "pickle": (_pickle, "safetensors"),
    "nested_config": (_nested_config, "nested too deep"),
    "config_from_dev_zero": (_config_from_dev_zero, "not a regular file"),
    "nan_alpha": (_nan_alpha, "lora_alpha must be a positive finite number"),
    "nan_weights": (_nan_weights, "NaN"),
    "redos_pattern": (_redos_pattern, "exponential time"),
}


@pytest.mark.parametrize("case", CASES)
def test_hostile_peft_folders_are_refused(llm, good, tmp_path, case):
    spoil, reason = CASES[case]
    folder = _copy(good, tmp_path, case)
    spoil(folder)
    started = time.monotonic()
    with pytest.raises(LoRAError, match=reason) as refused:
        llm.load_lora(case, str(folder))
    assert time.monotonic() - started < 10
    assert str(folder) in str(refused.value) and len(str(refused.value)) < 400
    assert case not in llm.engine.loras.adapters
    assert llm.generate(["river stone"], SamplingParams(max_tokens=2, temperature=0))[0].outputs[0].token_ids


def _quotes(message: str) -> bool:
    return any(part in message for part in ("b'root", "x:0:0", "secret-line", "GGUFroot"))


def test_errors_never_quote_a_file(llm, tmp_path):
    """The first bytes of any readable file came back in the error ("magic b'root'")."""
    for name, text in (("secret.gguf", SECRET), ("secret", SECRET), ("version", "GGUF" + SECRET)):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(LoRAError) as refused:
            llm.load_lora(name, str(path))
        assert not _quotes(str(refused.value)), refused.value
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(SECRET)
    with pytest.raises(LoRAError) as refused:
        llm.load_lora("folder", str(folder))
    assert not _quotes(str(refused.value)), refused.value


def test_mutated_adapters_fail_cleanly(llm, good, tmp_path):
    """Generated hostile adapters: the good adapter's safetensors header and adapter_config.json with bytes
    overwritten, 60 seeded times each. Each loads or is refused with a LoRAError: nothing else."""
    import random

    rng = random.Random(34)
    weights, config = _weights(good).read_bytes(), (good / "adapter_config.json").read_bytes()
    header_end = 8 + int.from_bytes(weights[:8], "little")
    for i in range(120):
        folder = _copy(good, tmp_path, f"m{i}")
        target, data, end = ((_weights(folder), bytearray(weights), header_end) if i % 2 else
                             (folder / "adapter_config.json", bytearray(config), len(config)))
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(end)] = rng.choice([0, 0x22, 0x5B, 0x7B, 0x7F, 0xFF, rng.randrange(256)])
        target.write_bytes(data)
        try:
            llm.load_lora(f"m{i}", str(folder))
        except LoRAError as exc:
            assert len(str(exc)) < 1000, exc
        else:
            llm.unload_lora(f"m{i}")
        shutil.rmtree(folder)
    assert llm.generate(["river stone"], SamplingParams(max_tokens=2, temperature=0))[0].outputs[0].token_ids
