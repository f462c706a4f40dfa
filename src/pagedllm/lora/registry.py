"""The engine's LoRA adapters by name: loaded and unloaded at run time, at most `max_loras` at once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..config import LoRAConfig, ModelConfig
from ..models.registry import FamilySpec
from .adapter import LoRAAdapter, LoRAError, load_adapter
from .layers import ModelAdapters


@dataclass(frozen=True)
class LoadedAdapter:
    id: int  # unique for the engine's lifetime: the prefix cache keys blocks by it
    name: str
    path: Path
    rank: int


class LoRARegistry:
    def __init__(self, model, config: ModelConfig, family: FamilySpec, lora: LoRAConfig):
        self.model_config, self.family, self.config = config, family, lora
        self.applied = ModelAdapters(model)
        self.adapters: dict[str, LoadedAdapter] = {}
        self._next_id = 1

    def read(self, name: str, path: str | os.PathLike) -> LoRAAdapter:
        """Parse and check an adapter without touching the model (callers may do this off the engine thread)."""
        if not isinstance(name, str) or not name.strip() or len(name) > 256:
            raise LoRAError("a LoRA adapter needs a name of 1 to 256 characters")
        adapter = load_adapter(name, path, self.model_config, self.family)
        if adapter.rank > self.config.max_lora_rank:
            raise LoRAError(f"LoRA adapter {name!r} has rank {adapter.rank}, more than --max-lora-rank "
                            f"{self.config.max_lora_rank}")
        return adapter

    def add(self, adapter: LoRAAdapter) -> LoadedAdapter:
        """Apply a parsed adapter to the model under its name."""
        if adapter.name in self.adapters:
            raise LoRAError(f"a LoRA adapter named {adapter.name!r} is already loaded; unload it first")
        if len(self.adapters) >= self.config.max_loras:
            raise LoRAError(f"{len(self.adapters)} LoRA adapters are loaded, the most --max-loras allows; "
                            "unload one first")
        loaded = LoadedAdapter(self._next_id, adapter.name, adapter.path, adapter.rank)
        self.applied.add(loaded.id, adapter)
        self._next_id += 1
        self.adapters[adapter.name] = loaded
        return loaded

    def load(self, name: str, path: str | os.PathLike) -> LoadedAdapter:
        return self.add(self.read(name, path))

    def remove(self, name: str) -> None:
        loaded = self.get(name)
        self.applied.remove(loaded.id)
        del self.adapters[name]

    def get(self, name: str) -> LoadedAdapter:
        if name not in self.adapters:
            known = ", ".join(sorted(self.adapters)) or "none are loaded"
            raise LoRAError(f"no LoRA adapter named {name!r} ({known})")
        return self.adapters[name]
