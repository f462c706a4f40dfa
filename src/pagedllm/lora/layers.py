"""Many LoRA adapters in one batch step.

Every layer an adapter may update (attention's q/k/v and o, a dense MLP's gate/up and down) gets a
`LoRALayer` on `Linear.lora`, the plug point `Linear.forward` calls after its product. A step's tokens
come from requests with different adapters (or none): the model runner groups the flat-token rows by
adapter into a `LoRAContext` shared by all the model's layers, and each layer adds, per adapter
segment, (x_rows·Aᵀ)·Bᵀ to its output rows: a loop over the adapters in the step, each one batched over
all its tokens — never over requests. A fused layer (q/k/v, gate/up) keeps one product per adapter:
its shards' A stacked, their B block-diagonal.

Decode steps stay on the fused C++ decode layer (models/fused_decode.py), which adds the same Aᵀ, Bᵀ
products per adapter segment inside the layer.

Routed experts are not targets (their products see rows sorted by expert, not the step's rows).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..layers.linear import Linear
from ..layers.mlp import MLP
from .adapter import LoRAAdapter, LoRAError, LoRAUpdate


@dataclass
class LoRAContext:
    """The step's adapter segments: (adapter id, its flat-token rows; None when it has every row)."""

    segments: list[tuple[int, torch.Tensor | None]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self.segments)

    @contextlib.contextmanager
    def applied(self, segments: list[tuple[int, torch.Tensor | None]]):
        """The segments for the forward passes of the block; none after it (the next caller sees the base)."""
        self.segments = segments
        try:
            yield
        finally:
            self.segments = []


def lora_segments(adapter_ids: list[int], query_start, device: torch.device) -> list[tuple[int, torch.Tensor | None]]:
    """Segments for a step whose request i (adapter `adapter_ids[i]`, 0 for none) owns flat rows
    query_start[i]..query_start[i+1]-1."""
    used = sorted(set(adapter_ids) - {0})
    if not used:
        return []
    if len(used) == 1 and all(adapter_ids):  # the whole step on one adapter: no gather, no scatter
        return [(used[0], None)]
    rows: dict[int, list[int]] = {a: [] for a in used}
    for i, adapter in enumerate(adapter_ids):
        if adapter:
            rows[adapter] += range(int(query_start[i]), int(query_start[i + 1]))
    return [(a, torch.tensor(r, dtype=torch.long, device=device)) for a, r in rows.items()]


class LoRALayer:
    """The adapters of one Linear: per adapter id, (Aᵀ of its shards stacked [in, R], Bᵀ block-diagonal [R, out]),
    kept transposed and contiguous so that a step's update is one mm and one in-place addmm."""

    def __init__(self, layer: Linear, context: LoRAContext):
        self.layer, self.context = layer, context
        self.updates: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, adapter_id: int, shards: dict[int, LoRAUpdate], device: torch.device) -> None:
        layer = self.layer
        rank = sum(u.a.shape[0] for u in shards.values())
        a = torch.empty(rank, layer.in_features, device=device)
        b = torch.zeros(layer.out_features, rank, device=device)
        col = 0
        for shard, update in sorted(shards.items()):
            r, start = update.a.shape[0], layer.shard_offset(shard)
            a[col:col + r] = update.a
            b[start:start + layer.shard_sizes[shard], col:col + r] = update.b
            col += r
        self.updates[adapter_id] = (a.T.contiguous(), b.T.contiguous())

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` (x·Wᵀ, fresh from the layer's method) with each segment's update added in place."""
        if not self.context.segments or not self.updates:
            return out
        rows_x, rows_out = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        for adapter_id, rows in self.context.segments:
            update = self.updates.get(adapter_id)
            if update is None:
                continue
            a_t, b_t = update
            xs = rows_x if rows is None else rows_x.index_select(0, rows)
            low = torch.mm(xs.to(a_t.dtype), a_t)
            if rows is None and rows_out.dtype == b_t.dtype:
                rows_out.addmm_(low, b_t)  # the whole step on one adapter (decode of one stream): two calls
            elif rows is None:
                rows_out += torch.mm(low, b_t).to(out.dtype)
            else:
                rows_out.index_add_(0, rows, torch.mm(low, b_t).to(out.dtype))
        return out


def lora_targets(model) -> dict[str, tuple[Linear, int]]:
    """Checkpoint tensor (less .weight) → (layer, shard) of every linear an adapter may update."""
    targets = {}
    for layer in model.layers:
        recurrent = layer.conv if layer.conv is not None else layer.linear_attn
        linears = ([layer.self_attn.qkv_proj, layer.self_attn.o_proj] if recurrent is None
                   else [recurrent.in_proj, recurrent.out_proj])
        if isinstance(layer.mlp, MLP):
            linears += [getattr(layer.mlp, "gate_up_proj", None) or layer.mlp.up_proj, layer.mlp.down_proj]
        for linear in linears:
            targets.update({name: (linear, shard) for shard, name in enumerate(linear.checkpoint_names)})
    return targets


class ModelAdapters:
    """The adapters applied to one model, by id (ids are never reused: the prefix cache keys blocks by them)."""

    def __init__(self, model):
        if model.tp is not None:
            raise LoRAError("LoRA adapters are not supported with tensor parallelism")
        self.model, self.context = model, LoRAContext()
        self.targets = lora_targets(model)
        self.device = model.norm.weight.device
        self._layers: dict[int, list[LoRALayer]] = {}
        model.lora_context = self.context  # the layers (fused decode ones too) read the step's segments here

    def add(self, adapter_id: int, adapter: LoRAAdapter) -> None:
        by_layer: dict[int, tuple[Linear, dict[int, LoRAUpdate]]] = {}
        for name, update in adapter.updates.items():
            if name not in self.targets:
                raise LoRAError(f"LoRA adapter {adapter.path}: it updates {name}, which is not a layer pagedllm can "
                                "adapt (attention q/k/v/o and dense MLP projections can be)")
            linear, shard = self.targets[name]
            expected = (linear.shard_sizes[shard], linear.in_features)
            if (update.b.shape[0], update.a.shape[1]) != expected:
                raise LoRAError(f"LoRA adapter {adapter.path}: {name} is {update.b.shape[0]}×{update.a.shape[1]}, "
                                f"the model's is {expected[0]}×{expected[1]}: an adapter of another model?")
            by_layer.setdefault(id(linear), (linear, {}))[1][shard] = update
        layers = []
        for linear, shards in by_layer.values():
            if linear.lora is None:
                linear.lora = LoRALayer(linear, self.context)
            linear.lora.add(adapter_id, shards, self.device)
            layers.append(linear.lora)
        self._layers[adapter_id] = layers

    def remove(self, adapter_id: int) -> None:
        for layer in self._layers.pop(adapter_id, []):
            layer.updates.pop(adapter_id, None)
