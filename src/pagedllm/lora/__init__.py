"""LoRA adapters: read (PEFT, llama.cpp GGUF), applied many at once in one batch step, merged into weights."""

from .adapter import LoRAAdapter, LoRAError, LoRAUpdate, load_adapter
from ..config import LoRAConfig
from .registry import LoadedAdapter, LoRARegistry

__all__ = ["LoRAAdapter", "LoRAConfig", "LoRAError", "LoRARegistry", "LoRAUpdate", "LoadedAdapter", "load_adapter"]
