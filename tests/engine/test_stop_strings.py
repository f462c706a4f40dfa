"""Property test: every chunking of random texts with random stop strings gives the same text,
streamed or whole, and never a stop string."""

from __future__ import annotations

import itertools
import random

from pagedllm.engine.stop_strings import StopStringMatcher


def reference(text: str, stops: tuple[str, ...]) -> tuple[str, str | None]:
    """Cut at the occurrence that ends first (ties: starts first), as generation would stop there."""
    found = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if not found:
        return text, None
    _, start, stop = min(found)
    return text[:start], stop


def run(chunks: list[str], stops: tuple[str, ...]) -> tuple[str, str | None]:
    matcher = StopStringMatcher(stops)
    emitted = ""
    for chunk in chunks:
        emitted += matcher.feed(chunk)
        assert not any(s in emitted for s in stops)
        if matcher.stopped_by:
            break
    return emitted + matcher.flush(), matcher.stopped_by


def chunkings(text: str):
    for cuts in itertools.product([False, True], repeat=len(text) - 1):
        pieces, start = [], 0
        for i, cut in enumerate(cuts, start=1):
            if cut:
                pieces.append(text[start:i])
                start = i
        yield pieces + [text[start:]]


def test_every_chunking_agrees_with_the_whole_text():
    rng = random.Random(0)
    cases = 0
    for _ in range(300):
        alphabet = "ab c\u00e9"[:rng.randint(2, 5)]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10)))
        stops = tuple({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))})
        expected = reference(text, stops)
        assert run([text], stops) == expected
        for chunks in chunkings(text):
            assert run(chunks, stops) == expected, (text, stops, chunks)
            cases += 1
    assert cases > 10_000


def test_held_text_is_released_when_it_cannot_become_a_stop():
    matcher = StopStringMatcher(("STOP",))
    assert matcher.feed("abc ST") == "abc "
    assert matcher.feed("AR") == "STAR"
    assert matcher.feed("S") == ""
    assert matcher.flush() == "S" and matcher.stopped_by is None
