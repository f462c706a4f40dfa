"""Beam search, diverse beam search and contrastive search through the engine.

Beam search is checked against transformers' own beam search on a tiny random llama; contrastive
search against a plain re-statement of transformers 4's algorithm over full (uncached) forwards of
the same model, since transformers 5 moved it to a Hub download."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.sampling_params import SamplingParamsError
from helpers import FLOAT

PROMPTS = ["The capital of France is", "def fibonacci(n):", "My favourite season is", "Water boils at"]


@pytest.fixture(scope="module")
def llm():
    # The float path: packed rows depend slightly on their batch (a step with a prefill chunk takes the
    # module path, a decode-only step the fused one), and beam scores have near-ties.
    return LLM(kv_cache_memory=64 * 2**20, max_num_batched_tokens=256, quantization=FLOAT)


@pytest.fixture(scope="module")
def tiny(tiny_models):
    model = tiny_models["llama"]
    return model, LLM(str(model.gguf_path), kv_cache_memory=8 * 2**20, block_size=4)


def _beams(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, use_beam_search=True, **kwargs)


def _prompt(seed: int, length: int = 10) -> list[int]:
    return torch.randint(3, 49152, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_beam_width_1_is_greedy(llm):
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24))
    beams = llm.generate(PROMPTS, _beams(best_of=1, max_tokens=24))
    assert [o.token_ids for o in beams] == [o.token_ids for o in greedy]
    assert llm.engine.stats().kv_blocks_free == llm.engine.stats().kv_blocks_total


def _hf_beams(hf, ids: list[int], eos: list[int], width: int, max_tokens: int, **kwargs) -> list[list[int]]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), num_beams=width, num_return_sequences=width, do_sample=False,
                          max_new_tokens=max_tokens, eos_token_id=eos, pad_token_id=eos[0], **kwargs)
    sequences = []
    for row in out[:, len(ids):].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        sequences.append(row[:end])
    return sequences


def _stop_that_ends_a_beam(hf, ids: list[int], eos: list[int]) -> int:
    """A random model almost never says EOS: pick a token of transformers' beams that, made a stop
    token, ends a returned beam early, so that the finished-hypothesis bookkeeping is exercised."""
    beams = _hf_beams(hf, ids, eos, 4, 10)
    for position in range(3, 9):
        for beam in beams:
            ref = _hf_beams(hf, ids, eos + [beam[position]], 4, 10)
            if any(len(r) < 10 and r[-1] == beam[position] for r in ref):
                return beam[position]
    raise AssertionError("no token ends a beam early")


@pytest.mark.parametrize("options", [{}, {"length_penalty": 0.5}, {"early_stopping": True},
                                     {"early_stopping": "never", "length_penalty": 1.5}])
def test_beam_width_4_matches_transformers(tiny, options):
    hf_model, llm = tiny[0].hf_model, tiny[1]
    eos = sorted(llm.get_tokenizer().stop_token_ids)
    for seed in range(3):
        ids = _prompt(seed)
        stop = _stop_that_ends_a_beam(hf_model, ids, eos)
        ref = _hf_beams(hf_model, ids, eos + [stop], 4, 10, **options)
        out = llm.generate({"prompt_token_ids": ids}, _beams(n=4, max_tokens=10, stop_token_ids=[stop], **options))[0]
        assert [o.token_ids for o in out.outputs] == ref, (seed, options)
        if not options:  # (a length penalty > 1 may rank the early-finished beams out of the top 4)
            assert any(o.finish_reason == "stop" and o.stop_reason == stop for o in out.outputs)
    assert llm.engine.stats().kv_blocks_free == llm.engine.stats().kv_blocks_total


def test_beams_share_blocks(llm):
    engine = llm.engine
    engine.add_request("beams", "Once upon a time, in a land far away,", _beams(n=4, max_tokens=40))
    peak = 0
    while engine.has_unfinished():
        engine.step()
        stats = engine.stats()
        peak = max(peak, stats.kv_blocks_total - stats.kv_blocks_free)
    prompt_blocks = -(-len(llm.get_tokenizer().encode("Once upon a time, in a land far away,")) // 16)
    unshared = 4 * -(-(len(llm.get_tokenizer().encode("Once upon a time, in a land far away,")) + 40) // 16)
    assert prompt_blocks < peak < unshared


def test_one_beam_group_is_beam_search(llm):
    plain = llm.generate(PROMPTS[:2], _beams(n=4, max_tokens=16))
    grouped = llm.generate(PROMPTS[:2], _beams(n=4, max_tokens=16, num_beam_groups=1, diversity_penalty=5.0))
    assert [[o.token_ids for o in r.outputs] for r in grouped] == [[o.token_ids for o in r.outputs] for r in plain]


def test_diversity_penalty_makes_groups_start_differently(llm):
    """With a large penalty, no group may open with a token an earlier group chose at that step."""
    for prompt in PROMPTS:
        out = llm.generate(prompt, _beams(n=4, max_tokens=12, num_beam_groups=4, diversity_penalty=100.0))[0]
        firsts = [o.token_ids[0] for o in out.outputs]
        assert len(set(firsts)) == 4, (prompt, firsts)
        same = llm.generate(prompt, _beams(n=4, max_tokens=12, num_beam_groups=4))[0]
        assert len({tuple(o.token_ids) for o in same.outputs}) == 1  # no penalty: every group is the same search


@torch.no_grad()
def _contrastive_reference(hf, ids: list[int], alpha: float, k: int, steps: int) -> list[int]:
    """transformers 4's contrastive search, one full forward per candidate."""
    out = hf(torch.tensor([ids]), output_hidden_states=True)
    context, logits, generated = out.hidden_states[-1][0], out.logits[0, -1], []
    for _ in range(steps):
        top = logits.softmax(-1).topk(k)
        runs = [hf(torch.tensor([ids + generated + [t]]), output_hidden_states=True) for t in top.indices.tolist()]
        hidden = torch.stack([r.hidden_states[-1][0, -1] for r in runs])
        similarity = (hidden / hidden.norm(dim=-1, keepdim=True)) @ (context / context.norm(dim=-1, keepdim=True)).T
        best = int(((1 - alpha) * top.values - alpha * similarity.max(dim=-1).values).argmax())
        generated.append(int(top.indices[best]))
        context, logits = torch.cat([context, hidden[best:best + 1]]), runs[best].logits[0, -1]
    return generated


def test_contrastive_search_matches_reference(tiny):
    hf_model, llm = tiny[0].hf_model, tiny[1]
    for seed in range(3):
        ids = _prompt(seed + 10)
        ref = _contrastive_reference(hf_model, ids, 0.6, 4, 10)
        params = SamplingParams(temperature=0, penalty_alpha=0.6, top_k=4, max_tokens=10, ignore_eos=True)
        assert llm.generate({"prompt_token_ids": ids}, params)[0].token_ids == ref
    assert llm.engine.stats().kv_blocks_free == llm.engine.stats().kv_blocks_total


def test_contrastive_search_without_penalty_weight_is_greedy(llm):
    """alpha -> 0 ranks by probability alone: the greedy tokens."""
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16))
    contrastive = llm.generate(PROMPTS, SamplingParams(temperature=0, penalty_alpha=1e-9, top_k=3, max_tokens=16))
    assert [o.token_ids for o in contrastive] == [o.token_ids for o in greedy]


def test_searches_batch_with_other_requests(llm):
    """Searches mixed into a batch of sampled requests give what they give alone."""
    beam, contrastive = _beams(n=3, max_tokens=12), SamplingParams(temperature=0, penalty_alpha=0.5, top_k=4,
                                                                    max_tokens=12)
    alone = [llm.generate(PROMPTS[0], beam)[0], llm.generate(PROMPTS[1], contrastive)[0]]
    mixed = llm.generate(PROMPTS + PROMPTS[:2], [SamplingParams(max_tokens=20, seed=1)] * 4 + [beam, contrastive])
    assert [o.token_ids for o in mixed[4].outputs] == [o.token_ids for o in alone[0].outputs]
    assert mixed[5].token_ids == alone[1].token_ids


def test_search_under_a_small_kv_cache():
    """Beams that do not all fit are preempted and recomputed; the result is the same."""
    roomy = LLM(kv_cache_memory=64 * 2**20, quantization=FLOAT)
    tight = LLM(kv_cache_memory=roomy.engine.kv_spec.bytes_per_block * 13, max_num_batched_tokens=64,
                quantization=FLOAT)
    params = [_beams(n=4, max_tokens=30), _beams(n=2, max_tokens=30), _beams(n=4, max_tokens=30)]
    want = roomy.generate(PROMPTS[:3], params)
    got = tight.generate(PROMPTS[:3], params)
    assert [[o.token_ids for o in r.outputs] for r in got] == [[o.token_ids for o in r.outputs] for r in want]
    assert tight.engine.stats().num_preemptions > 0
    assert tight.engine.stats().kv_blocks_free == tight.engine.stats().kv_blocks_total


@pytest.mark.parametrize("kwargs, field", [
    ({"use_beam_search": True, "temperature": 0.8}, "temperature"),
    ({"use_beam_search": True, "temperature": 0, "stop": ["x"]}, "stop"),
    ({"use_beam_search": True, "temperature": 0, "best_of": 4, "num_beam_groups": 3}, "num_beam_groups"),
    ({"length_penalty": 2.0}, "length_penalty"),
    ({"penalty_alpha": 0.5, "temperature": 0}, "top_k"),
    ({"penalty_alpha": 0.5, "temperature": 0, "top_k": 4, "n": 2}, "n"),
    ({"use_beam_search": True, "temperature": 0, "early_stopping": "sometimes"}, "early_stopping"),
])
def test_search_parameters_are_checked(kwargs, field):
    with pytest.raises(SamplingParamsError, match=field):
        SamplingParams(**kwargs)
