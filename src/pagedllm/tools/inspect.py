"""Probes: look inside a model layer by layer on one prompt.

Per decoder layer: the cosine distance between the layer's input and output hidden states (how
much the layer turns the residual stream), the norm of its output (the residual stream's size),
and the logit lens — the top-K next tokens read from that layer's output through the final norm
and the output head; when asked, the attention weights of chosen heads between chosen tokens.
The prompt runs as one prefill on a private KV cache of its own, so the engine's cache and its
other requests are untouched; the model shows its layers through the `observe` plug point of
Transformer.forward, which costs nothing when no one observes.

`compare_layers` is the numerics diff: the same prompt through the model and a reference (the
model's float path, another checkpoint of it, or transformers), layer by layer — where does a
quantised model drift?
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from ..attention import kv_bytes_per_token
from ..engine.model_runner import ModelRunner, plan_kv_cache
from ..engine.sequence import Sequence
from ..engine.scheduler import ScheduledSequence
from ..errors import PagedLLMError
from ..models.loaders import ModelSource, load_model, resolve_model
from ..models.transformer import LayerObserver, Transformer
from ..sampling_params import SamplingParams


Rotations = list[tuple[torch.Tensor, torch.Tensor]]


class ProbeError(PagedLLMError, ValueError):
    """A probe that cannot be taken as asked (a layer, head or token the model or prompt lacks)."""


@dataclass
class LayerProbe:
    """One layer's readings; the lists run over the prompt's positions."""

    layer: int
    cos_distance: list[float]
    residual_norm: list[float]
    top_k: list[list[tuple[int, float]]]  # per position: (token id, logprob) from the logit lens, best first

    def summary(self) -> dict:
        """The last position's readings (what the next token is decided from)."""
        return {"layer": self.layer, "cos_distance": self.cos_distance[-1], "residual_norm": self.residual_norm[-1],
                "top_k": [list(pair) for pair in self.top_k[-1]]}


_QUERY_PART = r"(-?\d+|\*)"
_QUERY = re.compile(rf"^(\d+)(?::{_QUERY_PART}(?::{_QUERY_PART}(?::{_QUERY_PART})?)?)?$")


@dataclass(frozen=True)
class AttentionQuery:
    """Which attention weights to read: a layer, and a head, query token and key token (None: all of
    them). Token indices count from the prompt's start; negative ones from its end (-1: the last)."""

    layer: int
    head: int | None = None
    query: int | None = None
    key: int | None = None

    @classmethod
    def parse(cls, text: str) -> "AttentionQuery":
        """`L[:H[:i[:j]]]`, `*` for all (the CLI's --attention and the API's strings)."""
        match = _QUERY.match(str(text).strip())
        if not match:
            raise ProbeError(f"attention {text!r}: expected LAYER[:HEAD[:QUERY[:KEY]]] (integers, * for all)")
        layer, *rest = match.groups()
        return cls(int(layer), *(None if part in (None, "*") else int(part) for part in rest))

    @classmethod
    def of(cls, value: "AttentionQuery | str | tuple | list") -> "AttentionQuery":
        if isinstance(value, AttentionQuery):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, (tuple, list)) and 1 <= len(value) <= 4 and all(
                v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in value) and value[0] is not None:
            return cls(*value)
        raise ProbeError(f"attention {value!r}: expected 'L:H:i:j' or (layer, head, query, key)")


@dataclass
class AttentionProbe:
    """weights[h][i][j]: how much query token queries[i] attends to key token keys[j] in head heads[h]."""

    layer: int
    heads: list[int]
    queries: list[int]
    keys: list[int]
    weights: list[list[list[float]]]

    def as_json(self) -> dict:
        return {"layer": self.layer, "heads": self.heads, "queries": self.queries, "keys": self.keys,
                "weights": self.weights}


@dataclass
class Inspection:
    token_ids: list[int]
    layers: list[LayerProbe] = field(default_factory=list)
    attention: list[AttentionProbe] = field(default_factory=list)

    def as_json(self) -> dict:
        body = {"token_ids": self.token_ids, "layers": [probe.summary() for probe in self.layers]}
        if self.attention:
            body["attention"] = [probe.as_json() for probe in self.attention]
        return body


def _checked_layers(layers: list[int] | None, count: int) -> list[int]:
    if layers is None:
        return list(range(count))
    wrong = [i for i in layers if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < count]
    if wrong:
        raise ProbeError(f"layers: this model has layers 0..{count - 1}; got {wrong[0]!r}")
    return sorted(set(layers))


def _index(value: int | None, count: int, what: str) -> list[int]:
    if value is None:
        return list(range(count))
    if not -count <= value < count:
        raise ProbeError(f"attention: {what} {value} is out of range (there are {count})")
    return [value % count]


# A probe runs in slices (the server's core takes one between two engine steps, so the streams it serves
# go on): prefill chunks of this many tokens, as the scheduler's budget cuts a long prompt, and logit-lens
# rows of this many positions (each a row of vocabulary logits, as costly as a token's output head).
PREFILL_SLICE_TOKENS = 512
LENS_SLICE_ROWS = 256

T = TypeVar("T")
Slices = Generator[None, None, T]


def run_slices(slices: Slices[T]) -> T:
    """Run a sliced computation to its end; its result."""
    while True:
        try:
            next(slices)
        except StopIteration as done:
            return done.value


@torch.inference_mode()
def prefill_slices(model: Transformer, token_ids: list[int], observe: LayerObserver,
                   block_size: int = 16) -> Slices[tuple[torch.Tensor, Rotations]]:
    """Run `token_ids` as a chunked prefill on a private KV cache, showing each layer to `observe` (once per
    chunk), yielding between chunks; returns the final hidden states [tokens, hidden] and the rotations of
    every token (Transformer.rotations)."""
    if not token_ids:
        raise ProbeError("the prompt is empty")
    if model.tp is not None:
        raise ProbeError("probes need the whole model in one process (not under --tensor-parallel-size)")
    cfg = model.config
    dtype, device = model.norm.weight.dtype, model.norm.weight.device
    states = 1 if cfg.is_hybrid else 0  # a hybrid's recurrent layers keep the sequence's state in slot 0
    memory = kv_bytes_per_token(cfg, dtype) * (len(token_ids) + block_size) + states * cfg.state_bytes_per_sequence
    spec = plan_kv_cache(cfg, block_size, memory, dtype, state_slots=states)
    runner = ModelRunner(model, spec, device, dtype)
    sequence = Sequence("inspect", list(token_ids), SamplingParams(max_tokens=1))
    finals, rotations, table = [], [], [list(range(spec.num_blocks))]
    while sequence.num_computed_tokens < len(token_ids):
        if finals:
            yield
        chunk = min(PREFILL_SLICE_TOKENS, len(token_ids) - sequence.num_computed_tokens)
        batch = runner.prepare([ScheduledSequence(sequence, chunk)], table, [0] * states)
        finals.append(model(batch.input_ids, batch.positions, runner.kv_caches, batch.meta, observe=observe))
        rotations.append(model.rotations(batch.positions, batch.meta, dtype))
        sequence.num_computed_tokens += chunk
    whole = [tuple(torch.cat(parts) for parts in zip(*per_rope)) for per_rope in zip(*rotations)]
    return torch.cat(finals), whole


def prefill_observed(model: Transformer, token_ids: list[int], observe: LayerObserver,
                     block_size: int = 16) -> tuple[torch.Tensor, Rotations]:
    """prefill_slices, run whole."""
    return run_slices(prefill_slices(model, token_ids, observe, block_size))


def _attention_probe(model: Transformer, query: AttentionQuery, layer_input: torch.Tensor,
                     rotations: Rotations) -> AttentionProbe:
    layer = model.layers[query.layer]
    if layer.self_attn is None:
        raise ProbeError(f"layer {query.layer} is a {model.config.layer_mixer(query.layer).replace('_', ' ')} layer, "
                         f"not attention: it has no attention weights (attention layers: "
                         f"{', '.join(map(str, model.config.attention_layers))})")
    tokens = len(layer_input)
    heads = _index(query.head, layer.self_attn.num_heads, "head")
    queries, keys = _index(query.query, tokens, "query token"), _index(query.key, tokens, "key token")
    cos, sin = rotations[layer.rope_index]
    weights = layer.self_attn.probabilities(layer.input_layernorm(layer_input), cos, sin)
    chosen = weights[heads][:, queries][:, :, keys]
    return AttentionProbe(query.layer, heads, queries, keys, chosen.tolist())


# What one probe request may cost the server (the core takes probes between two engine steps, so a big one
# stalls every stream): layer × position cells of the logit lens (each a row of vocabulary logits), and
# attention weights returned. 2,000 tokens' attention came to a 471 MB response; 1,000 tokens' lens
# stalled every other client ~24 s (measured, SmolLM2-135M on 2 vCPU).
MAX_LENS_CELLS = 16_384
MAX_ATTENTION_WEIGHTS = 1_048_576


def check_probe_budget(config, num_tokens: int, layers: list[int] | None,
                       attention: list[AttentionQuery | str | tuple] | None) -> None:
    """Refuse probes past the budgets above, before anything is computed."""
    lens = num_tokens * (config.num_hidden_layers if layers is None else len(set(layers)))
    if lens > MAX_LENS_CELLS:
        raise ProbeError(f"probes: {num_tokens} tokens × {lens // max(num_tokens, 1)} layers is past the budget of "
                         f"{MAX_LENS_CELLS} layer-positions; ask for fewer layers or a shorter prompt")
    weights = 0
    for query in (AttentionQuery.of(q) for q in attention or []):
        heads = 1 if query.head is not None else config.num_attention_heads
        weights += heads * (1 if query.query is not None else num_tokens) * (1 if query.key is not None else num_tokens)
    if weights > MAX_ATTENTION_WEIGHTS:
        raise ProbeError(f"probes: {weights} attention weights asked for, past the budget of {MAX_ATTENTION_WEIGHTS}; "
                         "name a head or a query token")


def inspect_slices(model: Transformer, token_ids: list[int], layers: list[int] | None = None, top_k: int = 10,
                   block_size: int = 16, attention: list[AttentionQuery | str | tuple] | None = None) -> Slices[Inspection]:
    """Probe `layers` (all by default) of `model` on `token_ids`, in slices; `attention`: weights to read. The
    arguments are checked at once (the error comes before any slice)."""
    count = model.config.num_hidden_layers
    chosen = _checked_layers(layers, count)
    queries = [AttentionQuery.of(q) for q in attention or []]
    _checked_layers([q.layer for q in queries], count)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ProbeError(f"top_k must be a positive integer, got {top_k!r}")
    return _inspection(model, list(token_ids), chosen, top_k, block_size, queries)


@torch.inference_mode()
def _inspection(model: Transformer, token_ids: list[int], chosen: list[int], top_k: int, block_size: int,
                queries: list[AttentionQuery]) -> Slices[Inspection]:
    wanted = set(chosen) | {q.layer for q in queries}
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def observe(index: int, before: torch.Tensor, after: torch.Tensor) -> None:
        if index in wanted:  # the next layer may update `after` in place
            seen.setdefault(index, []).append((before.clone(), after.clone()))

    _, rotations = yield from prefill_slices(model, token_ids, observe, block_size)
    inputs = {index: torch.cat([before for before, _ in chunks]) for index, chunks in seen.items()}
    inspection = Inspection(token_ids)
    for index in chosen:
        after = torch.cat([after for _, after in seen.pop(index)])
        probe = yield from _layer_probe(model, index, inputs[index].float(), after, top_k)
        inspection.layers.append(probe)
    for query in queries:
        yield
        inspection.attention.append(_attention_probe(model, query, inputs[query.layer], rotations))
    return inspection


def _layer_probe(model: Transformer, index: int, before: torch.Tensor, after: torch.Tensor,
                 top_k: int) -> Slices[LayerProbe]:
    """A layer's readings, its logit lens LENS_SLICE_ROWS positions a slice."""
    top: list[list[tuple[int, float]]] = []
    for start in range(0, len(after), LENS_SLICE_ROWS):
        yield
        rows = model.norm(after[start:start + LENS_SLICE_ROWS])
        lens = torch.log_softmax(model.compute_logits(rows).float(), dim=-1)
        values, ids = lens.topk(min(top_k, lens.shape[-1]), dim=-1)
        top += [list(zip(row_ids.tolist(), row_values.tolist())) for row_ids, row_values in zip(ids, values)]
    after = after.float()
    return LayerProbe(index, (1 - torch.nn.functional.cosine_similarity(before, after, dim=-1)).tolist(),
                      after.norm(dim=-1).tolist(), top)


def inspect_model(model: Transformer, token_ids: list[int], layers: list[int] | None = None, top_k: int = 10,
                  block_size: int = 16, attention: list[AttentionQuery | str | tuple] | None = None) -> Inspection:
    """inspect_slices, run whole."""
    return run_slices(inspect_slices(model, token_ids, layers, top_k, block_size, attention))


# -- the numerics diff ------------------------------------------------------------------------------

@dataclass
class LayerOutputs:
    """Each decoder layer's output hidden states [tokens, hidden] (before the final norm) and the logits."""

    hidden: list[torch.Tensor]
    logits: torch.Tensor


# A model to compare against: token ids → its layer outputs.
Reference = Callable[[list[int]], LayerOutputs]


@torch.inference_mode()
def pagedllm_outputs(model: Transformer, token_ids: list[int], block_size: int = 16) -> LayerOutputs:
    hidden: dict[int, torch.Tensor] = {}
    final, _ = prefill_observed(model, token_ids, lambda i, _before, after: hidden.__setitem__(i, after.to(torch.float32, copy=True)),
                             block_size)
    return LayerOutputs([hidden[i] for i in range(len(hidden))], model.compute_logits(final).float())


@torch.inference_mode()
def transformers_outputs(hf_model: torch.nn.Module, token_ids: list[int]) -> LayerOutputs:
    """The same from a transformers causal LM, through hooks on its decoder layers."""
    outputs: dict[int, torch.Tensor] = {}
    layers = hf_model.model.layers

    def hook(index: int):
        return lambda _m, _a, out: outputs.__setitem__(index, (out[0] if isinstance(out, tuple) else out)[0].float())

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        device = next(hf_model.parameters()).device
        logits = hf_model(torch.tensor([token_ids], device=device)).logits[0].float()
    finally:
        for handle in handles:
            handle.remove()
    return LayerOutputs([outputs[i].cpu() for i in range(len(layers))], logits.cpu())


@dataclass
class LayerDiff:
    layer: int
    relative_error: float  # ‖ours − reference‖ / ‖reference‖ over all positions
    max_abs_error: float
    min_cosine: float  # the least cosine similarity of a position's hidden states

    def as_json(self) -> dict:
        return {"layer": self.layer, "relative_error": self.relative_error, "max_abs_error": self.max_abs_error,
                "min_cosine": self.min_cosine}


@dataclass
class Comparison:
    token_ids: list[int]
    layers: list[LayerDiff]
    logits_max_abs_error: float
    kl_divergence: float  # mean over positions of KL(reference ‖ ours) of the next-token distributions
    top1_agreement: float  # the share of positions whose argmax next token is the same

    def as_json(self) -> dict:
        return {"token_ids": self.token_ids, "layers": [d.as_json() for d in self.layers],
                "logits": {"max_abs_error": self.logits_max_abs_error, "kl_divergence": self.kl_divergence,
                           "top1_agreement": self.top1_agreement}}


def _layer_diff(index: int, ours: torch.Tensor, ref: torch.Tensor) -> LayerDiff:
    return LayerDiff(index, float((ours - ref).norm() / ref.norm().clamp_min(1e-30)),
                     float((ours - ref).abs().max()),
                     float(torch.nn.functional.cosine_similarity(ours, ref, dim=-1).min()))


def compare_layers(model: Transformer, reference: Reference, token_ids: list[int], block_size: int = 16) -> Comparison:
    """The numerics diff of `model` against `reference` on `token_ids`, layer by layer."""
    ours = pagedllm_outputs(model, token_ids, block_size)
    ref = reference(list(token_ids))
    if len(ref.hidden) != len(ours.hidden) or ref.hidden[0].shape != ours.hidden[0].shape:
        raise ProbeError(f"the reference has {len(ref.hidden)} layers of width {ref.hidden[0].shape[-1]}; "
                         f"the model {len(ours.hidden)} of width {ours.hidden[0].shape[-1]}")
    if ref.logits.shape != ours.logits.shape:
        raise ProbeError(f"the reference's vocabulary ({ref.logits.shape[-1]}) is not the model's "
                         f"({ours.logits.shape[-1]})")
    ref_logprobs, our_logprobs = ref.logits.log_softmax(-1), ours.logits.log_softmax(-1)
    kl = (ref_logprobs.exp() * (ref_logprobs - our_logprobs)).sum(-1).mean()
    agree = (ref.logits.argmax(-1) == ours.logits.argmax(-1)).float().mean()
    return Comparison(list(token_ids), [_layer_diff(i, a, b) for i, (a, b) in enumerate(zip(ours.hidden, ref.hidden))],
                      float((ours.logits - ref.logits).abs().max()), float(kl), float(agree))


def load_reference(source: ModelSource, reference: str, device: str = "cpu") -> Reference:
    """The model to diff against, for a model loaded from `source`: `transformers` (the same Hugging Face
    folder through transformers, eager attention), `float` (the same source on pagedllm's float path:
    no packed or load-time quantised weights) or a path to another checkpoint of the model (in float)."""
    if reference == "transformers":
        if source.kind != "hf":
            raise ProbeError("the transformers reference needs a Hugging Face folder; for a GGUF file, give the "
                             "original checkpoint's folder as the reference")
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32,
                                                        attn_implementation="eager").to(device).eval()
        return lambda ids: transformers_outputs(hf_model, ids)
    float_source = source if reference == "float" else resolve_model(reference)
    float_model = load_model(float_source, device, torch.float32, quantization="none")
    return lambda ids: pagedllm_outputs(float_model, ids)
