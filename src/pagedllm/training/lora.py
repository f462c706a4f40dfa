"""LoRA adapters that train, on the `Linear.lora` plug point, and their PEFT folder.

Each targeted checkpoint tensor (`model.layers.0.self_attn.q_proj`) gets its own A [rank, in] and
B [rows, rank], initialised as PEFT does (A Kaiming-uniform, B zero: training starts from the base
model). A fused layer (q/k/v, gate/up) runs its shards' A as one product and adds each shard's B·(A·x)
to its rows. The folder written is what `pagedllm serve --lora-modules` and PEFT read: B's rows go back
to the checkpoint's order (the inverse of the loaders' row moves), keys
`base_model.model.<module>.lora_{A,B}.weight`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import ModelConfig
from ..errors import PagedLLMError
from ..layers.linear import Linear
from ..lora.layers import lora_targets
from ..models.loaders import model_rows
from ..models.registry import FamilySpec

# The module names --lora-targets accepts (PEFT's target_modules), by the layers they pick.
TARGET_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TrainableLoRA(nn.Module):
    """The trainable update of one Linear: shards → (A, B); `shards` in the layer's shard order."""

    def __init__(self, layer: Linear, shards: list[int], rank: int, scale: float):
        super().__init__()
        self.layer_rows = [(layer.shard_offset(s), layer.shard_sizes[s]) for s in range(len(layer.shard_sizes))]
        self.shards, self.rank, self.scale = shards, rank, scale
        self.a = nn.Parameter(torch.empty(len(shards) * rank, layer.in_features))
        self.b = nn.ParameterList(nn.Parameter(torch.zeros(layer.shard_sizes[s], rank)) for s in shards)
        for part in self.a.split(rank):  # each shard's A as PEFT initialises a LoRA layer's
            nn.init.kaiming_uniform_(part, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        low = (x @ self.a.T.to(x.dtype)).split(self.rank, dim=-1)
        by_shard = dict(zip(self.shards, (part @ b.T.to(part.dtype) for part, b in zip(low, self.b))))
        parts = [by_shard[s] if s in by_shard else out.new_zeros(*out.shape[:-1], size)
                 for s, (_, size) in enumerate(self.layer_rows)]
        return out + (torch.cat(parts, dim=-1) * self.scale).to(out.dtype)


class TrainableAdapter(nn.Module):
    """Every TrainableLoRA of a model, by the checkpoint tensors they update."""

    def __init__(self, model, rank: int, alpha: float, targets: tuple[str, ...] = TARGET_NAMES):
        super().__init__()
        unknown = sorted(set(targets) - set(TARGET_NAMES))
        if unknown or not targets:
            raise PagedLLMError(f"--lora-targets: {', '.join(unknown) or 'none given'}: pick from "
                                f"{', '.join(TARGET_NAMES)}")
        if rank < 1 or alpha <= 0:
            raise PagedLLMError(f"--lora-rank must be at least 1 and --lora-alpha positive, got {rank} and {alpha}")
        self.rank, self.alpha, self.targets = rank, alpha, tuple(targets)
        chosen: dict[int, tuple[Linear, list[int]]] = {}
        self.names: list[tuple[str, int, int]] = []  # (checkpoint tensor, index into `updates`, shard position)
        for name, (linear, shard) in lora_targets(model).items():
            if name.rsplit(".", 1)[-1] in targets:
                chosen.setdefault(id(linear), (linear, []))[1].append(shard)
        self.updates = nn.ModuleList()
        for linear, shards in chosen.values():
            update = TrainableLoRA(linear, sorted(shards), rank, alpha / rank)
            linear.lora = update
            for position, shard in enumerate(update.shards):
                self.names.append((linear.checkpoint_names[shard], len(self.updates), position))
            self.updates.append(update)
        if not self.updates:
            raise PagedLLMError("--lora-targets picks no layer of this model")

    def pair(self, name_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one checkpoint tensor, in the model's row order."""
        _, index, position = self.names[name_index]
        update = self.updates[index]
        return update.a[position * self.rank:(position + 1) * self.rank], update.b[position]

    def save_peft(self, folder: Path, config: ModelConfig, family: FamilySpec, base: str) -> None:
        """A PEFT adapter folder; `base`: the base model's path, recorded for the reader."""
        tensors = {}
        for i, (name, _, _) in enumerate(self.names):
            a, b = self.pair(i)
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().float().contiguous().cpu()
            tensors[f"base_model.model.{name}.lora_B.weight"] = checkpoint_order(
                f"{name}.weight", b.detach().float().cpu(), config, family)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        adapter_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank, "lora_alpha": self.alpha,
                          "target_modules": sorted(self.targets), "lora_dropout": 0.0, "bias": "none",
                          "fan_in_fan_out": False, "use_rslora": False, "base_model_name_or_path": base,
                          "inference_mode": True}
        (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=1), encoding="utf-8")


def checkpoint_order(name: str, rows: torch.Tensor, config: ModelConfig, family: FamilySpec) -> torch.Tensor:
    """`rows` of canonical tensor `name` (output rows as the model holds them) in the checkpoint's order:
    the loaders' row moves replayed on row numbers, then undone."""
    numbers = torch.arange(rows.shape[0], dtype=torch.float32)[:, None]
    ((_, placed),) = list(model_rows([(name, numbers)], config, family))
    order = placed[:, 0].long()  # the model's row i is the checkpoint's row order[i]
    out = torch.empty_like(rows)
    out[order] = rows
    return out.contiguous()
