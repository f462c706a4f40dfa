"""Grammars compile first in a child process (issue 34): a grammar that crashes llguidance's native code,
or runs past its time, is refused, and the next grammar is served by a new child."""

from __future__ import annotations

import textwrap

import pytest
from llguidance import LLMatcher

from pagedllm.models.loaders import default_model_path
from pagedllm.models.loaders import ModelSource
from pagedllm.sampling import grammar_sandbox
from pagedllm.sampling.grammar_sandbox import GrammarSandbox
from pagedllm.sampling_params import StructuredOutputError
from pagedllm.tokenizer.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelSource("gguf", default_model_path()))


def _sandbox(tokenizer, seconds: float = grammar_sandbox.GRAMMAR_COMPILE_SECONDS) -> GrammarSandbox:
    return GrammarSandbox(tokenizer.backend.to_str(), sorted(tokenizer.stop_token_ids), seconds)


def _ref_chain(depth: int) -> dict:
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(depth)}
    return {"$ref": "#/$defs/d0", "$defs": {**defs, f"d{depth}": {"type": "integer"}}}


def test_a_grammar_that_crashes_the_compiler_is_refused_and_the_next_is_served(tokenizer):
    """The 1,000-deep $ref chain, past grammar_bounds' check: it ends the child with a segmentation fault
    (it ended the engine core before); the child's replacement compiles the next grammar."""
    sandbox = _sandbox(tokenizer)
    sandbox.check(LLMatcher.grammar_from_regex("[a-z]+"))
    crashing = LLMatcher.grammar_from_json_schema(_ref_chain(1000))
    with pytest.raises(StructuredOutputError, match="crashed"):
        sandbox.check(crashing)
    with pytest.raises(StructuredOutputError, match="crashed"):  # remembered: no second child spent on it
        sandbox.check(crashing)
    sandbox.check(LLMatcher.grammar_from_regex("[0-9]+"))
    sandbox.close()


def test_a_grammar_past_its_time_is_refused(tokenizer, tmp_path, monkeypatch):
    """A child that never answers for one grammar (as a compile that runs away would): refused after the
    bound, the child killed, the next grammar served."""
    hanging = tmp_path / "hanging_child.py"
    hanging.write_text(textwrap.dedent("""
        import sys, time
        sys.stdin.readline()
        print("ready", flush=True)
        for line in sys.stdin:
            if "hang" in line:
                time.sleep(600)
            print("done", flush=True)
    """))
    monkeypatch.setattr(grammar_sandbox, "_CHILD", hanging)
    sandbox = _sandbox(tokenizer, seconds=0.5)
    with pytest.raises(StructuredOutputError, match="longer than 0.5 s"):
        sandbox.check("hang")
    sandbox.check("fine")
    sandbox.close()
