"""`pagedllm inspect`: tables, --json, --attention, --diff and --plot on a tiny model."""

from __future__ import annotations

import json

import pytest

from pagedllm.entrypoints.cli import main
from pagedllm.models.loaders import ModelSource, load_model
from pagedllm.tokenizer import load_tokenizer
from pagedllm.tools.inspect import inspect_model


def test_json_is_one_object_with_the_issue_shape(tiny_models, capsys):
    folder = tiny_models["qwen2"].hf_dir
    assert main(["inspect", str(folder), "Hello there, world", "--layers", "0-1", "--top-k", "4", "--json",
                 "--attention", "1:0:-1:*"]) == 0
    body = json.loads(capsys.readouterr().out)
    source = ModelSource("hf", folder)
    ids = load_tokenizer(source).encode("Hello there, world")
    expected = inspect_model(load_model(source), ids, [0, 1], 4, attention=["1:0:-1:*"]).as_json()
    assert body["token_ids"] == ids
    assert [set(layer) for layer in body["layers"]] == [{"layer", "cos_distance", "residual_norm", "top_k"}] * 2
    assert [[t for t, _ in layer["top_k"]] for layer in body["layers"]] == [
        [t for t, _ in layer["top_k"]] for layer in expected["layers"]]
    assert body["attention"][0]["weights"][0][0] == pytest.approx(expected["attention"][0]["weights"][0][0])


def test_tables_diff_and_plots(tiny_models, capsys, tmp_path):
    folder = tiny_models["llama"].hf_dir
    assert main(["inspect", str(folder), "one two three four", "--quantization", "int4", "--diff", "float",
                 "--attention", "0:1", "--plot", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr()
    assert "logit lens at the last position" in out.out and "attention, layer 0" in out.out
    assert "numerics diff against float" in out.out and "KL(reference ‖ model)" in out.out
    written = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert written == ["attention-L0-H1.png", "layers.png"]
    assert all((tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG" for name in written)


@pytest.mark.parametrize("argv, message", [
    (["--layers", "a-b"], "--layers 'a-b'"),
    (["--layers", "7"], "layers: this model has layers 0..1"),
    (["--attention", "0:9"], "head 9 is out of range"),
    (["--diff", "/no/such/model"], "no such file or folder"),
])
def test_errors_are_one_line(tiny_models, capsys, argv, message):
    assert main(["inspect", str(tiny_models["llama"].hf_dir), "a prompt", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_transformers_diff_needs_a_folder(tiny_models, capsys):
    assert main(["inspect", str(tiny_models["llama"].gguf_path), "a prompt", "--diff", "transformers"]) == 2
    assert "needs a Hugging Face folder" in capsys.readouterr().err
