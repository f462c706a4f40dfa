"""Detokenisation, chat templates and GGUF vocabularies."""

from __future__ import annotations

import time

import pytest

from pagedllm.models.loaders import ModelSource
from pagedllm.tokenizer import IncrementalDetokenizer, load_tokenizer
from pagedllm.tokenizer.chat_template import RENDER_SECONDS, ChatTemplateError, render_chat
from pagedllm.tokenizer.gguf_vocab import TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, build_gguf_tokenizer
from pagedllm.tokenizer.tokenizer import FIM_TOKEN_NAMES

TEXTS = ["héllo wörld", "你好，世界！", "emoji 🙂🚀👩‍💻 mix", "plain ascii text", "混合 text 和 🙂 in one"]


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    return load_tokenizer(ModelSource("gguf", default_gguf))


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_never_breaks_a_character(tokenizer, text):
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Prompt:"))
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids)


def test_detokenizer_flush_gives_back_an_unfinished_character(tokenizer):
    ids = tokenizer.encode("🙂")
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.add(ids[0]) == ""  # the first byte(s) of a four-byte character
    assert detok.flush() != ""


def test_chat_template_matches_known_rendering(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set x = messages.append(1) %}{{ x }}",
])
def test_chat_template_is_sandboxed(template):
    with pytest.raises(ChatTemplateError):
        render_chat(template, [{"role": "user", "content": "x"}])


@pytest.mark.parametrize("template,reason", [
    ("{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}x", "longer than"),
    ("{{ 'a' * 300000000 }}", "repetition"),
    ("{{ [1] * 300000000 }}", "repetition"),
    ("{{ 2 ** 100000000 }}", "power"),
    ("{% for a in range(99999) %}{{ 'x' * 1000 }}{% endfor %}", "renders more than"),
    ("{{ 'x'.ljust(1000000000) }}", "count or width"),
    ("{% set w = 1000000000 %}{{ 'x'|center(w) }}", "count or width"),
    ("{% set w = 1000000000 %}{{ messages[0].content|indent(w) }}", "count or width"),
])
def test_chat_template_renders_within_bounds(template, reason):
    """Each of these blocked a server's event loop or drove `chat` to 20 GB (issue 34)."""
    started = time.monotonic()
    with pytest.raises(ChatTemplateError, match=reason):
        render_chat(template, [{"role": "user", "content": "x"}])
    assert time.monotonic() - started < RENDER_SECONDS + 2


def test_a_render_cut_short_leaves_the_thread_clean():
    with pytest.raises(ChatTemplateError):
        render_chat("{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}",
                    [{"role": "user", "content": "x"}])
    time.sleep(0.1)  # nothing raised late: the deadline is disarmed
    assert render_chat("{{ messages[0].content }}", [{"role": "user", "content": "x"}]) == "x"


def test_chat_template_errors_are_clear():
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat("{% for %}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="only users"):
        render_chat("{{ raise_exception('only users') }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="role"):
        render_chat("{{ messages }}", [{"content": "no role"}])


def _spm_metadata() -> dict:
    # A merge-closed vocabulary, as SentencePiece BPE builds them: each piece is two others merged.
    chars = ["\u2581", "h", "e", "l", "o", "w", "r", "d"]
    merged = ["\u2581h", "\u2581he", "ll", "llo", "\u2581hello", "\u2581w", "or", "\u2581wor", "ld", "\u2581world"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars + merged
    types = [2, TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_BYTE] * 256 + [TOKEN_NORMAL] * (len(chars) + len(merged))
    scores = [0.0] * 259 + [-100.0] * len(chars) + [-float(i) for i in range(1, len(merged) + 1)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.unknown_token_id": 0}


def test_sentencepiece_vocabulary_from_gguf():
    tok = build_gguf_tokenizer(_spm_metadata(), "spm.gguf")
    assert tok.encode("hello world").tokens == ["\u2581hello", "\u2581world"]
    # a character outside the vocabulary falls back to its UTF-8 bytes
    assert tok.encode("hé").tokens == ["\u2581h", "<0xC3>", "<0xA9>"]
    assert tok.decode(tok.encode("hello wé").ids) == "hello wé"


def test_sentencepiece_without_space_prefix():
    """Gemma's GGUF vocabulary (add_space_prefix false): no space added in front, none stripped back."""
    tok = build_gguf_tokenizer({**_spm_metadata(), "tokenizer.ggml.add_space_prefix": False}, "gemma.gguf")
    assert tok.encode("hello world").tokens == ["h", "e", "llo", "\u2581world"]
    assert tok.encode(" hello").tokens == ["\u2581hello"]
    assert tok.decode(tok.encode(" hello world").ids) == " hello world"


@pytest.mark.parametrize("pre", ["glm4", "chatglm-bpe", "bloom"])
def test_new_families_pre_tokenizers_build(default_tokenizer_metadata, pre):
    """llama.cpp's pre-tokenizers of GLM-4 and BLOOM vocabularies are known (regexes from llama-vocab.cpp)."""
    tok = build_gguf_tokenizer({**default_tokenizer_metadata, "tokenizer.ggml.pre": pre}, "x.gguf")
    assert tok.decode(tok.encode("Hello, world! 12345").ids) == "Hello, world! 12345"


def test_o200k_pre_tokenizer_splits_as_its_regex(default_tokenizer_metadata):
    """gpt-oss's GGUF files name llama.cpp's "gpt-4o" pre-tokenizer: words keep a leading non-letter, CamelCase
    parts and contractions split as o200k's regex splits them, numbers in threes."""
    import regex

    from pagedllm.tokenizer.gguf_vocab import PRE_TOKENIZER_REGEXES

    tok = build_gguf_tokenizer({**default_tokenizer_metadata, "tokenizer.ggml.pre": "gpt-4o"}, "x.gguf")
    text = "HelloWorld, it's 1234567 (DON'T)\n\n  tabs\there"
    (pattern,) = PRE_TOKENIZER_REGEXES["gpt-4o"]
    pieces = [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
    expected = regex.findall(pattern, text)
    assert "".join(expected) == text and "World" in expected and "456" in expected
    assert [p.replace("Ġ", " ").replace("Ċ", "\n").replace("ĉ", "\t") for p in pieces] == expected
    assert tok.decode(tok.encode(text).ids) == text


def test_unknown_pre_tokenizer_is_named(default_tokenizer_metadata):
    meta = dict(default_tokenizer_metadata, **{"tokenizer.ggml.pre": "martian"})
    with pytest.raises(ValueError, match="'martian' is not supported"):
        build_gguf_tokenizer(meta, "x.gguf")


@pytest.mark.parametrize("names", FIM_TOKEN_NAMES)
def test_fill_in_the_middle_prompt_in_each_convention(default_gguf, names):
    """Prefix, suffix, middle (llama.cpp's /infill order) in the convention whose tokens the vocabulary
    has; the default model has none, so it is refused upstream."""
    tokenizer = load_tokenizer(ModelSource("gguf", default_gguf))
    assert tokenizer.fill_in_the_middle("a", "b") is None
    tokenizer.backend.add_special_tokens(list(names))
    pre, suf, mid = (tokenizer.token_to_id(n) for n in names)
    ids = tokenizer.fill_in_the_middle("def add(a, b):\n", "\n    return c\n")
    prefix, suffix = tokenizer.encode("def add(a, b):\n", False), tokenizer.encode("\n    return c\n", False)
    assert ids == [pre, *prefix, suf, *suffix, mid]


def test_chat_template_variables_reach_the_template(tokenizer):
    """A request's chat_template_kwargs (Qwen3's enable_thinking) are variables of the template."""
    import dataclasses

    template = ("{% for m in messages %}{{ m.content }}{% endfor %}"
                "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}")
    thinking = dataclasses.replace(tokenizer, chat_template=template)
    messages = [{"role": "user", "content": "Hi"}]
    assert thinking.apply_chat_template(messages) == "Hi"
    assert thinking.apply_chat_template(messages, enable_thinking=False) == "Hi<think>\n\n</think>\n\n"
