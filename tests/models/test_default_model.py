"""The default model (SmolLM2-135M-Instruct Q4_1 GGUF) against transformers loading the same file."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 2024, 3.14159 × 2 = 6.28318; call 555-0199 before 12:30.",
    "你好，世界！今天天气很好。机器学习是人工智能的一个分支。",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "Emoji: 🙂🚀👩‍💻 and accents: naïve café façade, Ünïcödé.",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "   leading spaces, trailing tabs\t\t\nand\r\nwindows newlines\n\n\n",
    "<|endoftext|>special tokens in the middle<|im_end|> of text",
    "Straße, ÅÄÖ, Ελληνικά, русский, العربية, हिन्दी",
]


@pytest.fixture(scope="module")
def hf_model(default_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(default_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)


@pytest.fixture(scope="module")
def llm():
    return LLM(kv_cache_memory=64 * 2**20, quantization="none")  # the float path: transformers dequantises too


def test_tokenizer_matches_transformers(llm, hf_tokenizer):
    ours = llm.get_tokenizer()
    for text in CORPUS:
        assert ours.encode(text) == hf_tokenizer.encode(text), text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


def test_tokenizer_splits_digits_like_llama_cpp(llm):
    """tokenizer.ggml.pre = smollm: llama.cpp isolates every digit before the BPE regex."""
    tok = llm.get_tokenizer()
    assert [tok.decode([i]) for i in tok.encode("12345")] == list("12345")


def _prompts(llm) -> dict[str, list[int]]:
    tok = llm.get_tokenizer()
    return {
        "plain": tok.encode("The history of the printing press begins"),
        "code": tok.encode("def quicksort(items):\n    \"\"\"Sort a list.\"\"\"\n"),
        "chat": tok.encode_chat([{"role": "user", "content": "Give me three tips for learning to cook."}]),
    }


def test_greedy_continuations_match_transformers(llm, hf_model):
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    prompts = _prompts(llm)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts.values()], params)
    for (name, ids), out in zip(prompts.items(), outs):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
        assert out.token_ids == ref[0, len(ids):].tolist(), name


def test_chat_answers_sensibly(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=32, temperature=0))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
