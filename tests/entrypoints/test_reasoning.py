"""The reasoning splitter on fixed model outputs: whole and streamed in every split of the text
(markers cut across deltas), thinking opened by the model or by the prompt, unclosed thinking."""

from __future__ import annotations

import pytest

from pagedllm.entrypoints.openai.reasoning import REASONING_FORMATS, ReasoningSplitter, detect_format

THINK = REASONING_FORMATS["think"]
CASES = [  # (prompt text, model output, reasoning, content)
    ("<|im_start|>assistant\n", "<think>\nTwo and two.\n</think>\n\nFour.", "\nTwo and two.\n", "Four."),
    ("<|im_start|>assistant\n", "Four.", "", "Four."),
    ("<|im_start|>assistant\n", "  Four <think> is a word here.", "", "  Four <think> is a word here."),
    ("<｜Assistant｜><think>\n", "Two and two.</think>Four.", "Two and two.", "Four."),
    ("<｜Assistant｜><think>\n", "Still thinking when the length ran out", "Still thinking when the length ran out", ""),
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", "Four.", "", "Four."),  # thinking switched off
    ("", "<think></think>", "", ""),
    ("", "<thin", "", "<thin"),
]


@pytest.mark.parametrize("prompt,output,reasoning,content", CASES)
def test_whole_text(prompt, output, reasoning, content):
    assert ReasoningSplitter(THINK, prompt).split(output) == (reasoning, content)


@pytest.mark.parametrize("prompt,output,reasoning,content", CASES)
def test_every_two_and_three_way_split_of_the_stream(prompt, output, reasoning, content):
    for i in range(len(output) + 1):
        for j in range(i, len(output) + 1, 3):
            splitter, got = ReasoningSplitter(THINK, prompt), ["", ""]
            for delta in (output[:i], output[i:j], output[j:]):
                for k, part in enumerate(splitter.feed(delta)):
                    got[k] += part
            for k, part in enumerate(splitter.finish()):
                got[k] += part
            assert tuple(got) == (reasoning, content), (i, j)


def test_format_detected_from_the_chat_template():
    assert detect_format("{% if enable_thinking %}<think>{% endif %}...</think>") == THINK
    assert detect_format("{{ messages }}") is None and detect_format(None) is None
