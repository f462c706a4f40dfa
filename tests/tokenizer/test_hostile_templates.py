"""Chat templates that build values past the output bound, and generated hostile templates (issue 34):
every render returns a bounded prompt or a ChatTemplateError, within its time budget and without the
memory such a value would take."""

from __future__ import annotations

import random
import resource
import time

import pytest

from pagedllm.tokenizer.chat_template import MAX_RENDER_CHARS, RENDER_SECONDS, ChatTemplateError, render_chat

MESSAGES = [{"role": "user", "content": "hi"}]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("template", [
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% set ns = namespace(s=[1]) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% set big = 'x' * 8000000 %}{% set y %}{% for i in range(1000) %}{{ big }}{% endfor %}{% endset %}",
    "{% macro m(s) %}{{ s }}{{ s }}{% endmacro %}{% set ns = namespace(s='ab') %}"
    "{% for i in range(40) %}{% set ns.s = m(ns.s) %}{% endfor %}",
    "{{ ('a' * 100000).replace('a', 'b' * 100000) }}",
    "{{ ('a' * 100000)|replace('a', 'b' * 100000) }}",
    "{{ ('a' * 1000000).replace('', 'b' * 40) }}",
    "{{ ('x' * 1000000).join(range(10000)|map('string')) }}",
    "{{ range(10000)|map('string')|join('x' * 1000000) }}",
    "{{ '%01000000000d' % 1 }}",
    "{{ '%0*d' % (1000000000, 1) }}",
    "{{ '{:>1000000000}'.format(1) }}",
    "{{ '{:{w}}'.format_map({'w': 1000000000}) }}",
    "{{ '%01000000000d'|format(1) }}",
    "{{ ('a\n' * 100000)|indent('x' * 1000000) }}",
    "{{ ('a ' * 1000000)|wordwrap(1, wrapstring='x' * 1000000) }}",
    "{{ ('\t' * 100000).expandtabs(8000000) }}",
    "{{ [[1]]|tojson(indent=100000000) }}",
])
def test_values_past_the_bound_are_refused_before_they_are_built(template):
    """Each built gigabytes within the 2 s time budget (or a MemoryError) before its check."""
    started, rss = time.monotonic(), _peak_rss_mb()
    with pytest.raises(ChatTemplateError, match=f"past {MAX_RENDER_CHARS}"):
        render_chat(template, MESSAGES)
    assert time.monotonic() - started < 1.0
    assert _peak_rss_mb() - rss < 400


def test_formatting_and_joins_within_the_bound_still_render():
    template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content ~ '!' }}{{ '%-5s|%3d' % ('a', 7) }}"
                "{{ '{:>4}'.format('z') }}{{ 'a b'.replace(' ', '_') }}{{ ['a', 'b']|join(', ') }}"
                "{{ 'Today 20240101: %s' % 'x' }}{{ m.content|indent(2, true) }}{% endfor %}")
    assert render_chat(template, MESSAGES) == "<|user|>hi!a    |  7   za_ba, bToday 20240101: x  hi"


_SIZES = [0, 1, 2, 7, 1000, 10**5, 10**7, 10**9]
_GROWERS = [
    "{% set ns.s = ns.s ~ ns.s %}", "{% set ns.s = ns.s + ns.s ~ 'a' %}", "{% set ns.s = ns.s * N %}",
    "{% set ns.s = ns.s.replace('a', ns.s) %}", "{% set ns.s = ns.s|replace('a', 'ab' * N) %}",
    "{% set ns.s = ns.l|join(ns.s) %}", "{% set ns.s = ns.s|indent(ns.s) %}", "{% set ns.s = ns.s|center(N) %}",
    "{% set ns.s = '%0*d' % (N, 1) %}", "{% set ns.s = ('{:>' ~ N ~ '}').format(ns.s) %}",
    "{% set ns.l = ns.l + ns.l %}", "{% set ns.l = ns.l * N %}", "{% set ns.l = ns.s|list %}",
    "{% set ns.s = ns.s|wordwrap(3, wrapstring=ns.s) %}", "{% set ns.s = ns.l|tojson %}",
    "{% set ns.s = m(ns.s) %}", "{{ ns.s }}", "{% set ns.s = ns.s.ljust(N) %}", "{% set ns.s = ns.s ~ N ** N %}",
]


def _hostile_template(rng: random.Random) -> str:
    """A random program over a string and a list that grow: 2-8 growing statements, some inside loops
    of random length (nested at most twice)."""
    body = []
    for _ in range(rng.randint(2, 8)):
        statement = rng.choice(_GROWERS).replace("N", str(rng.choice(_SIZES)))
        for _ in range(rng.choice([0, 0, 1, 2])):
            statement = f"{{% for i in range({rng.choice(_SIZES[:5])}) %}}{statement}{{% endfor %}}"
        body.append(statement)
    return ("{% macro m(s) %}{{ s }}{{ s }}{% endmacro %}{% set ns = namespace(s='ab', l=['a', 'b']) %}"
            + "".join(body) + "{{ ns.s }}{{ ns.l|length }}")


def test_generated_hostile_templates_stay_within_time_and_memory():
    """120 seeded programs of growing statements: each renders a bounded prompt or is refused with a
    ChatTemplateError, within its time budget, and the process never holds more than the bound allows."""
    rng, outcomes, rss = random.Random(34), {"rendered": 0, "refused": 0}, _peak_rss_mb()
    for _ in range(120):
        template, started = _hostile_template(rng), time.monotonic()
        try:
            assert len(render_chat(template, MESSAGES)) <= MAX_RENDER_CHARS
            outcomes["rendered"] += 1
        except ChatTemplateError:
            outcomes["refused"] += 1
        assert time.monotonic() - started < RENDER_SECONDS + 1, template
    assert min(outcomes.values()) > 10, outcomes  # the generator reaches both ends
    assert _peak_rss_mb() - rss < 1500, _peak_rss_mb() - rss
