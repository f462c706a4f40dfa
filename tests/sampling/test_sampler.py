"""The sampler's steps on batched random logits: each knob changes the distribution as documented."""

from __future__ import annotations

import math

import pytest
import torch

from pagedllm.sampling.sampler import Sampler, SamplingMetadata, SequenceState, apply_top_k_top_p_min_p
from pagedllm.sampling_params import SamplingParams, SamplingParamsError

VOCAB = 50


def meta_for(params: list[SamplingParams], outputs=None, prompts=None, generators=None, stop_ids=frozenset()):
    rows = [SequenceState(p, (prompts or [[]] * len(params))[i], (outputs or [[]] * len(params))[i],
                          (generators or [None] * len(params))[i], stop_ids) for i, p in enumerate(params)]
    return SamplingMetadata.build(rows, VOCAB, "cpu")


def random_logits(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_top_k_1_equals_greedy():
    logits = random_logits(64, 0)
    tokens = Sampler()(logits, meta_for([SamplingParams(temperature=1.5, top_k=1)] * 64)).tokens
    assert torch.equal(tokens, logits.argmax(-1))


def kept(logits: torch.Tensor, params: SamplingParams) -> set[int]:
    meta = meta_for([params])
    out = apply_top_k_top_p_min_p(logits[None] / params.temperature, meta)[0]
    return set(torch.nonzero(out > float("-inf")).flatten().tolist())


@pytest.mark.parametrize("seed", range(10))
def test_top_k_top_p_min_p_keep_exactly_their_sets(seed):
    logits = random_logits(1, seed)[0]
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True).tolist()
    assert kept(logits, SamplingParams(top_k=7)) == set(order[:7])
    # top-p: the smallest prefix of the sorted tokens whose mass reaches p
    p = 0.3 + 0.06 * seed
    mass, nucleus = 0.0, set()
    for token in order:
        nucleus.add(token)
        mass += probs[token].item()
        if mass >= p:
            break
    assert kept(logits, SamplingParams(top_p=p)) == nucleus
    min_p = 0.05 * (seed + 1)
    assert kept(logits, SamplingParams(min_p=min_p)) == {t for t in range(VOCAB) if probs[t] >= min_p * probs.max()}
    # top-k is applied before top-p: the nucleus is taken of the renormalised top-k
    top3 = probs[order[:3]] / probs[order[:3]].sum()
    expected = {order[0]} if top3[0] >= 0.5 else set(order[:2])
    assert kept(logits, SamplingParams(top_k=3, top_p=0.5)) == expected


def test_temperature_draws_follow_softmax_of_scaled_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-50.0] * (VOCAB - 4)]).repeat(20000, 1)
    for temperature in (0.5, 1.0, 2.0):
        tokens = Sampler()(logits, meta_for([SamplingParams(temperature=temperature)] * 20000)).tokens
        freq = torch.bincount(tokens, minlength=VOCAB)[:4].float() / len(tokens)
        expected = (logits[0, :4] / temperature).softmax(-1)
        assert torch.allclose(freq, expected, atol=0.015), (temperature, freq, expected)


def test_penalties_follow_the_documented_formula():
    logits = random_logits(1, 3)
    prompt, output = [1, 2], [2, 3, 3, 4]
    params = SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25)
    meta = meta_for([params], outputs=[output], prompts=[prompt])
    got = meta.penalties.apply(logits)[0]
    expected = logits[0].clone()
    for token in {1, 2, 3, 4}:  # repetition: every token of the prompt or output
        value = expected[token]
        expected[token] = value / 1.3 if value > 0 else value * 1.3
    for token in {2, 3, 4}:  # presence once, frequency per occurrence: output tokens only
        expected[token] -= 0.5 + 0.25 * output.count(token)
    torch.testing.assert_close(got, expected)


def test_repetition_penalty_lowers_repeated_tokens_in_greedy():
    logits = torch.zeros(1, VOCAB)
    logits[0, 5], logits[0, 6] = 2.0, 1.9
    plain = Sampler()(logits, meta_for([SamplingParams(temperature=0)], outputs=[[5]])).tokens
    penalised = Sampler()(logits, meta_for([SamplingParams(temperature=0, repetition_penalty=1.2)], outputs=[[5]])).tokens
    assert plain.item() == 5 and penalised.item() == 6


def test_logit_bias_and_min_tokens():
    logits = torch.zeros(2, VOCAB)
    logits[:, 7] = 5.0  # 7 plays EOS
    params = [SamplingParams(temperature=0, logit_bias={9: 10.0}), SamplingParams(temperature=0, min_tokens=3)]
    tokens = Sampler()(logits, meta_for(params, outputs=[[], [1]], stop_ids=frozenset({7}))).tokens
    assert tokens[0].item() == 9 and tokens[1].item() != 7
    grown = Sampler()(logits[:1], meta_for(params[1:], outputs=[[1, 2, 3]], stop_ids=frozenset({7}))).tokens
    assert grown.item() == 7  # min_tokens reached: EOS is allowed again


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = random_logits(8, 4)
    params = SamplingParams(temperature=1.0, seed=11)

    def draw(rows: list[int]) -> list[int]:
        gens = [torch.Generator().manual_seed(11) for _ in rows]
        return Sampler()(logits[rows], meta_for([params] * len(rows), generators=gens)).tokens.tolist()

    alone = [draw([r])[0] for r in range(8)]
    assert draw(list(range(8))) == alone and draw(list(range(7, -1, -1))) == alone[::-1]


def test_logprobs_and_ranks_are_the_models():
    logits = random_logits(4, 5)
    out = Sampler()(logits, meta_for([SamplingParams(temperature=1.0, logprobs=3)] * 4))
    reference = logits.log_softmax(-1)
    for row in range(4):
        token = out.tokens[row].item()
        assert math.isclose(out.logprobs[row].item(), reference[row, token].item(), abs_tol=1e-5)
        assert out.ranks[row].item() == int((reference[row] > reference[row, token]).sum()) + 1
        assert out.top_ids[row].tolist() == reference[row].topk(3).indices.tolist()


@pytest.mark.parametrize("bad", [
    dict(n=0), dict(n=2, best_of=1), dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(min_p=1.5),
    dict(repetition_penalty=0), dict(presence_penalty=3), dict(frequency_penalty=-2.5), dict(logit_bias={"x": 1}),
    dict(logit_bias={1: 200}), dict(stop=[""]), dict(stop=[3]), dict(stop_token_ids=[-1]), dict(logprobs=21),
    dict(prompt_logprobs=-1), dict(min_tokens=20, max_tokens=10), dict(timeout=0), dict(max_tokens=True),
])
def test_invalid_parameters_name_the_field(bad):
    with pytest.raises(SamplingParamsError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_parameters_are_normalised():
    params = SamplingParams(stop="END", logit_bias={"12": 1}, stop_token_ids=[3])
    assert params.stop == ("END",) and params.logit_bias == {12: 1.0} and params.stop_token_ids == (3,)
