"""Structured output on the default model: outputs always parse / match; bad grammars are refused."""

from __future__ import annotations

import json
import random
import re

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.sampling.structured_output import StructuredOutputError, StructuredOutputParams, ascii_digits

WORDS = ["red", "green", "blue", "cat", "dog", "fast", "slow"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    properties = {}
    for i in range(rng.randint(1, 4)):
        kind = rng.choice(["string", "integer", "boolean", "enum", "array"] + (["object"] if depth == 0 else []))
        name = f"{rng.choice(WORDS)}_{i}"
        if kind == "string":
            properties[name] = {"type": "string", "maxLength": rng.randint(1, 8)}
        elif kind == "integer":
            low = rng.randint(-50, 50)
            properties[name] = {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 100)}
        elif kind == "boolean":
            properties[name] = {"type": "boolean"}
        elif kind == "enum":
            properties[name] = {"enum": rng.sample(WORDS, rng.randint(1, 3))}
        elif kind == "array":
            properties[name] = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                "maxItems": rng.randint(0, 3)}
        else:
            properties[name] = random_schema(rng, depth + 1)
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def conforms(value, schema: dict) -> bool:
    """The subset of JSON schema random_schema writes."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema["type"]
    if kind == "object":
        return (isinstance(value, dict) and set(value) == set(schema["properties"])
                and all(conforms(value[k], s) for k, s in schema["properties"].items()))
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema["maxLength"]
    if kind == "integer":
        return type(value) is int and schema["minimum"] <= value <= schema["maximum"]
    if kind == "boolean":
        return isinstance(value, bool)
    return (isinstance(value, list) and len(value) <= schema["maxItems"]
            and all(conforms(v, schema["items"]) for v in value))


@pytest.fixture(scope="module")
def llm():
    return LLM(kv_cache_memory=128 * 2**20, max_num_batched_tokens=512)


def test_outputs_parse_on_50_random_schemas(llm):
    rng = random.Random(0)
    schemas = [random_schema(rng) for _ in range(50)]
    chats = [[{"role": "user", "content": "Describe an animal as a JSON object."}]] * 50
    params = [SamplingParams(max_tokens=160, temperature=0 if i % 2 else 0.8, seed=i,
                             structured_output=StructuredOutputParams(json=schema)) for i, schema in enumerate(schemas)]
    for schema, out in zip(schemas, llm.chat(chats, params)):
        assert out.finish_reason == "stop", (schema, out.text)
        assert conforms(json.loads(out.text), schema), (schema, out.text)


@pytest.mark.parametrize("pattern", [r"\d{3}-\d{4}", r"(yes|no), because [a-z ]{5,20}\.", r"[A-Z][a-z]{1,8} \d{1,3}"])
def test_outputs_match_the_regex(llm, pattern):
    outs = llm.generate(["My answer:"] * 3, [SamplingParams(max_tokens=40, temperature=t, seed=1,
                                                             structured_output=StructuredOutputParams(regex=pattern))
                                              for t in (0, 0.7, 1.2)])
    for out in outs:
        assert out.finish_reason == "stop" and re.fullmatch(ascii_digits(pattern), out.text), (pattern, out.text)


def test_choice_and_json_object(llm):
    choices = ("positive", "negative", "neutral")
    out = llm.generate("The film was wonderful. Sentiment:", SamplingParams(
        max_tokens=10, temperature=1.0, n=4, seed=2, structured_output=StructuredOutputParams(choice=choices)))[0]
    assert all(c.text in choices for c in out.outputs)
    obj = llm.chat([{"role": "user", "content": "Give me a person as JSON."}], SamplingParams(
        max_tokens=300, temperature=0, structured_output=StructuredOutputParams(json_object=True)))[0]
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.text), dict)


def test_bad_grammars_are_refused_at_admission(llm):
    for params in (StructuredOutputParams(regex="[a-"), StructuredOutputParams(json={"type": "nonsense"})):
        with pytest.raises(StructuredOutputError, match="structured output"):
            llm.engine.add_request("bad", "x", SamplingParams(structured_output=params))
    assert not llm.engine.has_unfinished()
    with pytest.raises(StructuredOutputError, match="exactly one"):
        StructuredOutputParams(regex="a", choice=("b",))
    with pytest.raises(StructuredOutputError, match="choice"):
        StructuredOutputParams(choice=())
