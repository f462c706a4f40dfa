"""gpt-oss's harmony format: fixed outputs split into reasoning, answer and tool calls (whole and in every split of
the stream), the forced-call grammar, the chat template (llama.cpp's copy of gpt-oss's, tests/entrypoints/data)
rendered as transformers renders it, the stop tokens, and a live server on a tiny gpt-oss with harmony's tokens."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import torch
from llguidance import LLMatcher, LLTokenizer
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from pagedllm.entrypoints.openai.harmony import HarmonyParser
from pagedllm.entrypoints.openai.tool_calls import TOOL_FORMATS, FunctionSpec, detect_tool_format
from pagedllm.models.loaders import ModelSource
from pagedllm.tokenizer import load_tokenizer
from pagedllm.tokenizer.chat_template import render_chat
from live_server import LiveServer

TEMPLATE = (Path(__file__).parent / "data" / "gpt_oss_chat_template.jinja").read_text(encoding="utf-8")
HARMONY_TOKENS = ["<|return|>", "<|constrain|>", "<|channel|>", "<|start|>", "<|end|>", "<|message|>", "<|call|>"]
WEATHER = FunctionSpec("get_weather", "The weather in a city",
                       {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
# For the random tiny model: arguments it must finish within a few tokens
CHOICE = FunctionSpec("get_weather", "The weather", {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                                            "required": ["city"], "additionalProperties": False})

# (model output, reasoning, content, [(name, arguments)])
OUTPUTS = [
    ("<|channel|>analysis<|message|>Two and two.<|end|><|start|>assistant<|channel|>final<|message|>Four.<|return|>",
     "Two and two.", "Four.", []),
    ("<|channel|>final<|message|>Four.", "", "Four.", []),  # the stop token itself not in the text
    ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
     'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>',
     "Need the weather.", "", [("get_weather", {"city": "Paris"})]),
    (' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Oslo"}<|call|>', "", "",
     [("get_weather", {"city": "Oslo"})]),  # the recipient before the channel, as the template writes history
    ("<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>commentary to=browser.search"
     '<|message|>{"query": "x"}<|call|>', '{"query": "x"}', "Checking.", []),  # a built-in tool: not a function
    ("<|channel|>analysis<|message|>Still thinking when the length ran out", "Still thinking when the length ran out",
     "", []),
    ('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Par', "", '{"city": "Par',
     []),  # arguments cut short: given back, not a call
    ("Plain words, no markers.", "", "Plain words, no markers.", []),
    ("<|channel|>final<|message|>2 < 3 and <|x|> stays.<|return|>", "", "2 < 3 and <|x|> stays.", []),
]


def _named(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("text,reasoning,content,calls", OUTPUTS)
def test_whole_and_every_two_and_three_way_split(text, reasoning, content, calls):
    got = HarmonyParser().parse(text)
    assert (got[0], got[1], _named(got[2])) == (reasoning, content, calls)
    for i in range(0, len(text) + 1, 2):
        for j in range(i, len(text) + 1, 5):
            parser, parts = HarmonyParser(), ["", "", []]
            for delta in (text[:i], text[i:j], text[j:], None):
                r, c, k = parser.feed(delta) if delta is not None else parser.finish()
                parts = [parts[0] + r, parts[1] + c, parts[2] + k]
            assert (parts[0], parts[1], _named(parts[2])) == (reasoning, content, calls), (i, j)


def test_a_forced_call_cut_short_is_dropped_not_content():
    text = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Par'
    assert HarmonyParser(forced=True).parse(text) == ("", "", [])


def test_the_format_is_detected_from_the_template():
    assert detect_tool_format(TEMPLATE).name == "harmony"
    assert detect_tool_format("{{ '<tool_call>' }}").name == "hermes"


@pytest.fixture(scope="module")
def harmony_folder(tmp_path_factory, default_gguf) -> Path:
    """A tiny gpt-oss whose tokenizer is the default model's plus harmony's special tokens, with gpt-oss's chat
    template and its stop tokens in generation_config.json."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    from conftest import TINY, _save_tokenizer

    folder = tmp_path_factory.mktemp("tiny-gpt-oss-harmony")
    _save_tokenizer(folder, default_gguf)
    backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in HARMONY_TOKENS])
    backend.save(str(folder / "tokenizer.json"))
    (folder / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
    ends = [backend.token_to_id("<|return|>"), backend.token_to_id("<|call|>")]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ends}), encoding="utf-8")
    config = GptOssConfig(**{**TINY, "vocab_size": backend.get_vocab_size(), "num_hidden_layers": 2,
                             "intermediate_size": 32}, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                          sliding_window=8)
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder


def test_harmony_stop_tokens(harmony_folder):
    """<|return|> and <|call|> end a reply; <|end|> closes one message of it and must not stop generation."""
    tokenizer = load_tokenizer(ModelSource("hf", harmony_folder))
    ids = {t: tokenizer.token_to_id(t) for t in HARMONY_TOKENS}
    assert {ids["<|return|>"], ids["<|call|>"]} <= tokenizer.stop_token_ids
    assert ids["<|end|>"] not in tokenizer.stop_token_ids


def test_the_template_renders_as_transformers_renders_it(harmony_folder):
    """A conversation with tools, an earlier call (its reasoning kept: no final answer follows it) and its result,
    by our sandboxed renderer and by transformers' — the same text."""
    from transformers import PreTrainedTokenizerFast

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "thinking": "Need the weather.",
                 "tool_calls": [{"id": "c1", "type": "function",
                                 "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]
    tools = [WEATHER.as_template_tool()]
    ours = render_chat(TEMPLATE, messages, True, tools=tools, reasoning_effort="low")
    reference = PreTrainedTokenizerFast(tokenizer_file=str(harmony_folder / "tokenizer.json"))
    theirs = reference.apply_chat_template(messages, tools=tools, chat_template=TEMPLATE, tokenize=False,
                                           add_generation_prompt=True, reasoning_effort="low")
    assert ours == theirs
    assert "<|start|>assistant<|channel|>analysis<|message|>Need the weather.<|end|>" in ours
    assert ours.endswith("<|start|>assistant") and "type get_weather = (_: {" in ours


def test_forced_call_grammar(harmony_folder):
    """tool_choice required: one call of an offered function, its markers as special tokens."""
    tokenizer = load_tokenizer(ModelSource("hf", harmony_folder))
    ll = LLTokenizer(tokenizer.backend.to_str(), eos_token=sorted(tokenizer.stop_token_ids))
    literal = lambda text: f"<[{tokenizer.special_token_id(text)}]>" if tokenizer.special_token_id(text) else json.dumps(text)  # noqa: E731
    grammar = TOOL_FORMATS["harmony"].grammar([WEATHER], parallel=False, literal=literal)

    def accepts(text: str) -> bool:
        matcher = LLMatcher(ll, LLMatcher.grammar_from_lark(grammar), log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        ids = tokenizer.encode(text, add_special_tokens=False)
        return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()

    call = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'  # then a stop
    assert accepts(call)
    assert not accepts(call.replace("get_weather", "get_time"))
    assert not accepts(call.replace('"city"', '"town"'))
    assert not accepts("<|channel|>final<|message|>Sunny.<|return|>")


def test_a_live_server_splits_harmony_replies(harmony_folder):
    """The tiny model's output made harmony-shaped by a grammar over its special tokens: the server's reply has the
    analysis as reasoning_content and the final message as content, whole and streamed; with tool_choice
    required, a call of the tool, finish_reason tool_calls."""
    with LiveServer(str(harmony_folder)) as live:
        ids = {t: live.tokenizer.token_to_id(t) for t in HARMONY_TOKENS}
        shaped = (f'start: <[{ids["<|channel|>"]}]> "analysis" <[{ids["<|message|>"]}]> /[a-z]{{2,6}}( [a-z]{{2,6}}){{1,2}}/'
                  f' <[{ids["<|end|>"]}]> <[{ids["<|start|>"]}]> "assistant" <[{ids["<|channel|>"]}]> "final" '
                  f'<[{ids["<|message|>"]}]> /[A-Z][a-z]{{2,6}}\\./ <[{ids["<|return|>"]}]>')
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0)
        ask = dict(model="test-model", messages=[{"role": "user", "content": "Is the sky blue?"}], max_tokens=40,
                   temperature=0, extra_body={"structured_outputs": {"grammar": shaped}})
        message = client.chat.completions.create(**ask).choices[0].message
        reasoning = message.model_extra["reasoning_content"]
        assert reasoning and "<|" not in reasoning and " " in reasoning
        assert message.content and "<|" not in message.content and message.content.endswith(".")
        deltas = [c.choices[0].delta for c in client.chat.completions.create(**ask, stream=True)]
        assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == reasoning
        assert "".join(d.content or "" for d in deltas) == message.content
        called = client.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=60,
            temperature=0, tools=[CHOICE.as_template_tool()], tool_choice="required")
        choice = called.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "get_weather"
        assert json.loads(choice.message.tool_calls[0].function.arguments)["city"] in ("Paris", "Oslo")
