"""Small helpers shared by tests."""

from __future__ import annotations

import torch

from pagedllm.engine.model_runner import ModelRunner, plan_kv_cache
from pagedllm.attention import kv_bytes_per_token
from pagedllm.engine.sequence import Sequence
from pagedllm.engine.scheduler import ScheduledSequence
from pagedllm.models.transformer import Transformer
from pagedllm.sampling_params import SamplingParams


@torch.inference_mode()
def prefill_hidden(model: Transformer, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Final-norm hidden states at every position of `ids`, one paged forward pass."""
    memory = kv_bytes_per_token(model.config, torch.float32) * (len(ids) + block_size) + model.config.state_bytes_per_sequence
    spec = plan_kv_cache(model.config, block_size, memory, torch.float32, state_slots=1)
    runner = ModelRunner(model, spec, "cpu", torch.float32)
    batch = runner.prepare([ScheduledSequence(Sequence("x", ids, SamplingParams()), len(ids))],
                           [list(range(spec.num_blocks))], [0])
    return model(batch.input_ids, batch.positions, runner.kv_caches, batch.meta)


def random_prompt(length: int, seed: int, vocab: int = 49152) -> list[int]:
    """`length` token ids drawn from the default tokenizer's vocabulary (past its 3 special ids), seeded."""
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy_reference(model, ids: list[int], tokens: int) -> list[int]:
    """transformers' greedy continuation of `ids`: exactly `tokens` new tokens."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return out[0, len(ids):].tolist()


def assert_chunked_forked_and_cached_generation(folder, model) -> None:
    """The engine on the Hugging Face folder against transformers' `model`: prefill in chunks of 8 tokens, decode,
    n = 2 forks sharing their prompt's blocks, and a second request resuming from the first one's cached prefix."""
    from pagedllm import LLM

    llm = LLM(str(folder), kv_cache_memory=2**20, block_size=4, max_num_batched_tokens=8)
    first = random_prompt(21, 5)
    second = first[:16] + random_prompt(5, 6)
    for ids in (first, second):
        out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                                     n=2))[0]
        assert [o.token_ids for o in out.outputs] == [greedy_reference(model, ids, 12)] * 2
    assert llm.engine.kv_cache.stats.hit_tokens == 16


def rank_prefill_logits(rank: int, size: int, port: int, sources: list, ids: list[int], out) -> None:
    """One rank of a tensor-parallel group (run by torch.multiprocessing.spawn): each source's model
    slice and its prefill logits of `ids` (all ranks take part; rank 0 saves the list to `out`)."""
    import torch.distributed as dist

    from pagedllm.distributed import init_group
    from pagedllm.models.loaders import load_model

    torch.set_num_threads(1)
    tp = init_group(rank, size, port, "cpu")
    logits = [prefill_logits(load_model(source, tp=tp), ids, block_size=4) for source in sources]
    if rank == 0:
        torch.save(logits, out)
    dist.barrier()
    dist.destroy_process_group()


@torch.inference_mode()
def prefill_logits(model: Transformer, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits at every position of `ids`, computed in one paged forward pass."""
    return model.compute_logits(prefill_hidden(model, ids, block_size))


def assert_packed_logits_close(ours: torch.Tensor, ref: torch.Tensor, mean: float = 0.03, peak: float = 0.25) -> None:
    """The stated tolerance of packed weights (int8 activations) against float: mean |Δ| ≤ 3% and
    max |Δ| ≤ 25% of the reference logits' standard deviation."""
    diff, spread = (ours - ref).abs(), ref.std().item()
    assert diff.mean().item() <= mean * spread, (diff.mean().item(), spread)
    assert diff.max().item() <= peak * spread, (diff.max().item(), spread)


def logits_and_routes(model, ids: list[int], block_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill logits, and each MoE layer's sorted expert choices [layers, tokens, top_k] (empty: dense)."""
    from pagedllm.layers.moe import SparseMoE

    routes = []
    hooks = [m.register_forward_hook(lambda m, args, out: routes.append(m.route(args[0])[1].sort(-1).values))
             for m in model.modules() if isinstance(m, SparseMoE)]
    try:
        logits = prefill_logits(model, ids, block_size)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, torch.stack(routes) if routes else torch.zeros(0, len(ids), 0)


def assert_packed_close_where_routes_agree(packed, dense, ids: list[int], block_size: int = 16) -> None:
    """A packed model against its float self: a router near a tie picks other experts from slightly different
    (quantised) inputs — those tokens are a different computation, not a precision loss. 9 in 10 tokens must
    route alike, and those hold the packed tolerance."""
    (ours, our_routes), (ref, ref_routes) = (logits_and_routes(m, ids, block_size) for m in (packed, dense))
    same = (our_routes == ref_routes).all(dim=2).all(dim=0)
    assert same.float().mean() >= 0.9
    assert_packed_logits_close(ours[same], ref[same])


# Tests of batch-shape invariance run the float path: packed weights take an int8 kernel for few
# rows and dequantised tiles for many, so a token's logits depend (slightly) on its batch.
FLOAT = "none"
NEAR_TIE = 1e-3  # vLLM's rule: a different batch shape may flip a token only where the top two were this close


def assert_same_or_near_tie(llm, prompts: list[str], expected: list[list[int]], got: list[list[int]]) -> None:
    """Greedy outputs equal, or they part where the two tokens' logits were within NEAR_TIE."""
    tokenizer = llm.get_tokenizer()
    for prompt, want, have in zip(prompts, expected, got):
        if have == want:
            continue
        k = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), None)
        assert k is not None, (prompt, "one output is a prefix of the other", want, have)
        logits = prefill_logits(llm.engine.model, tokenizer.encode(prompt) + want[:k])[-1]
        assert abs(logits[want[k]] - logits[have[k]]) < NEAR_TIE, (prompt, k)


def step_logits(llm, prompts: list[tuple[list[int], str | None]]) -> list[torch.Tensor]:
    """Every position's logits of several prompts run as one batch step, each with its adapter (or none)."""
    engine = llm.engine
    runner, bs = engine.runner, engine.kv_spec.block_size
    scheduled, tables, first = [], [], 0
    for i, (ids, lora) in enumerate(prompts):
        lora_id = engine.lora_adapter(lora).id if lora else 0
        scheduled.append(ScheduledSequence(Sequence(str(i), ids, SamplingParams(), lora_id=lora_id), len(ids)))
        blocks = -(-len(ids) // bs)
        tables.append(list(range(first, first + blocks)))
        first += blocks
    batch = runner.prepare(scheduled, tables, list(range(len(prompts))))  # hybrids: a fresh state slot each
    with engine.model.lora_context.applied(batch.lora_segments), torch.inference_mode():
        logits = engine.model.compute_logits(engine.model(batch.input_ids, batch.positions, runner.kv_caches,
                                                          batch.meta))
    return list(logits.split([len(ids) for ids, _ in prompts]))
