"""LoRA adapters read from disk: a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`) or
a llama.cpp GGUF LoRA file, as low-rank updates of the model's linear layers.

An adapter adds `scale · B·A` to a layer's W (A: [rank, in], B: [out, rank]). Here each update is
keyed by the canonical name of the checkpoint tensor it changes (`model.layers.0.self_attn.q_proj`),
with the scale folded into B and B's rows in the order the model holds W's: B goes through the same
renames, splits (Phi-3's fused q/k/v) and row orders (llama.cpp's q/k permutation, interleaved or
partial rotary) as the weights it updates, which all move whole output rows.

Adapter files are untrusted: anything pagedllm cannot apply exactly (DoRA, LoRA biases, fully trained
modules_to_save, embedding LoRA, fan-in/fan-out layouts) is refused with the reason.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import ModelConfig
from ..errors import PagedLLMError, shown
from ..models.loaders import model_rows, split_fused
from ..models.loaders.gguf_file import GGUFError, open_gguf
from ..models.loaders.gguf_loader import canonical_name, unpermute_rows
from ..models.loaders.hf_loader import HFModelError, canonical_hf_name, qkv_by_kind, read_json
from ..models.registry import FamilySpec

_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[\w-]+)?\.weight$")
_GGUF_KEY = re.compile(r"^(?P<base>.+\.weight)\.lora_(?P<which>[ab])$")


class LoRAError(PagedLLMError, ValueError):
    """An adapter that cannot be applied to this model; the message names the file and the problem."""


@dataclass(frozen=True)
class LoRAUpdate:
    """One layer's update: W + B·A, the scale already in B."""

    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank]


@dataclass
class LoRAAdapter:
    name: str
    path: Path
    rank: int  # the largest over its layers
    updates: dict[str, LoRAUpdate]  # canonical checkpoint tensor (less .weight) → its update

    @property
    def num_parameters(self) -> int:
        return sum(u.a.numel() + u.b.numel() for u in self.updates.values())


def load_adapter(name: str, path: str | os.PathLike, config: ModelConfig, family: FamilySpec,
                 model_order: bool = True) -> LoRAAdapter:
    """A PEFT adapter folder or a llama.cpp GGUF LoRA file, for a model of `config` and `family`. B's rows
    come in the model's order, or with `model_order` False in the canonical checkpoint's (fused tensors
    split, rotary rows as the checkpoint has them: tools/export.canonical_weights)."""
    path = Path(path).expanduser()
    if path.is_dir():
        modules, rank = _peft_modules(path)
        _check_value_head_order(path, modules, config)
        rows = _hf_rows
    elif path.is_file():
        modules, rank = _gguf_modules(path, family)
        rows = _gguf_rows
    else:
        raise LoRAError(f"LoRA adapter {str(path)!r}: no such folder or file")
    updates = {}
    for module, (a, b, scale) in modules.items():
        for canonical, b_rows in rows(module, b, config, family, model_order):
            updates[canonical] = LoRAUpdate(a.float().contiguous(), (b_rows.float() * scale).contiguous())
    if not updates:
        raise LoRAError(f"LoRA adapter {path}: it holds no LoRA weights")
    return LoRAAdapter(name, path, rank, updates)


# -- PEFT ---------------------------------------------------------------------------------------------
def _peft_modules(folder: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], int]:
    """{module (the base model's name): (A, B, scale)} and the largest rank."""
    try:
        cfg = read_json(folder / "adapter_config.json")
    except HFModelError as exc:
        raise LoRAError(f"LoRA adapter: {exc}") from None
    _check_peft_config(folder, cfg)
    pairs = _peft_pairs(folder)
    modules, rank = {}, 0
    for module, (a, b) in pairs.items():
        r = a.shape[0]
        alpha = _pattern_value(folder, cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
        if not _positive_number(alpha):
            raise LoRAError(f"{folder}: lora_alpha must be a positive finite number, got {shown(alpha)}")
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        modules[module], rank = (a, b, scale), max(rank, r)
    return modules, rank


def _check_peft_config(folder: Path, cfg: dict) -> None:
    refusals = {
        "peft_type": (cfg.get("peft_type", "LORA") != "LORA", f"a {shown(cfg.get('peft_type'))} adapter, not LoRA"),
        "use_dora": (bool(cfg.get("use_dora")), "DoRA adapters are not supported"),
        "bias": (cfg.get("bias", "none") != "none", "LoRA biases (bias != 'none') are not supported"),
        "modules_to_save": (bool(cfg.get("modules_to_save")),
                            f"fully trained modules ({shown(cfg.get('modules_to_save'))}) are not supported: merge the "
                            "adapter into a checkpoint instead"),
        "fan_in_fan_out": (bool(cfg.get("fan_in_fan_out")), "fan_in_fan_out (Conv1D) layouts are not supported"),
    }
    for key, (refused, why) in refusals.items():
        if refused:
            raise LoRAError(f"LoRA adapter {folder}: {why}")


def _peft_pairs(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise LoRAError(f"LoRA adapter {folder}: no adapter_model.safetensors (pickled .bin adapters are not loaded)")
    _check_safetensors_header(path)
    found: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            for key in f.keys():
                if "lora_embedding" in key or "lora_magnitude" in key:
                    raise LoRAError(f"{path}: {shown(key)}: embedding LoRA and DoRA magnitudes are not supported")
                match = _PEFT_KEY.match(key)
                if match is None:
                    raise LoRAError(f"{path}: unexpected tensor {shown(key)} (not a lora_A / lora_B weight)")
                found.setdefault(match["module"], {})[match["which"]] = f.get_tensor(key)
    except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
        if isinstance(exc, LoRAError):
            raise
        # The library's message may quote the header (any file's bytes): only its kind is shown.
        raise LoRAError(f"{path}: not a readable safetensors file ({type(exc).__name__})") from None
    return {module: _pair(path, module, parts.get("A"), parts.get("B")) for module, parts in found.items()}


MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own bound


def _check_safetensors_header(path: Path) -> None:
    """The 8-byte header length must fit the file (a pickle renamed .safetensors, or a length of 2^62, fails
    here, before the library maps anything)."""
    with open(path, "rb") as f:
        head = f.read(8)
    length = int.from_bytes(head, "little") if len(head) == 8 else None
    if length is None or length > min(path.stat().st_size - 8, MAX_HEADER_BYTES):
        raise LoRAError(f"{path}: not a safetensors file (its header length does not fit the file)")


def _pair(path: Path, module: str, a: torch.Tensor | None, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if a is None or b is None:
        raise LoRAError(f"{path}: {module} has lora_{'A' if a is None else 'B'} missing")
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or not a.is_floating_point() \
            or not b.is_floating_point():
        raise LoRAError(f"{path}: {module}: A {tuple(a.shape)} and B {tuple(b.shape)} are not a rank-r pair")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise LoRAError(f"{path}: {module}: its weights hold NaN or infinite values")
    return a, b


def _pattern_value(folder: Path, patterns, module: str, default):
    """PEFT's rank/alpha_pattern: the first key whose regex ends the module's name. Keys are checked first:
    one with nested repetition (`(a+)+`) can take exponential time on a module's name (ReDoS)."""
    if not isinstance(patterns, dict):
        raise LoRAError(f"{folder}: alpha_pattern must be an object of regular expressions to numbers")
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({_safe_pattern(folder, key)})$", module):
            return value
    return default


MAX_PATTERN_CHARS = 256
_REPEATS = {re._constants.MAX_REPEAT, re._constants.MIN_REPEAT, getattr(re._constants, "POSSESSIVE_REPEAT", None)}


def _safe_pattern(folder: Path, key: str) -> str:
    if len(key) > MAX_PATTERN_CHARS:
        raise LoRAError(f"{folder}: an alpha_pattern key is longer than {MAX_PATTERN_CHARS} characters")
    try:
        parsed = re._parser.parse(key)
    except (re.error, RecursionError, OverflowError):
        raise LoRAError(f"{folder}: alpha_pattern key {shown(key)} is not a regular expression") from None
    if _nested_repetition(parsed, inside_repeat=False):
        raise LoRAError(f"{folder}: alpha_pattern key {shown(key)} repeats a repetition or an alternation, which "
                        "can take exponential time to match")
    return key


def _nested_repetition(items, inside_repeat: bool) -> bool:
    """Whether a parsed pattern has a repeat (or an alternation) inside a repeat of more than one."""
    for op, arg in items:
        if op in _REPEATS:
            low, high, sub = arg
            if inside_repeat or _nested_repetition(sub, inside_repeat or high > 1):
                return True
        elif op is re._constants.BRANCH:
            if inside_repeat or any(_nested_repetition(branch, inside_repeat) for branch in arg[1]):
                return True
        elif op is re._constants.SUBPATTERN:
            if _nested_repetition(arg[-1], inside_repeat):
                return True
        elif op in (re._constants.ASSERT, re._constants.ASSERT_NOT):
            if _nested_repetition(arg[1], inside_repeat):
                return True
    return False


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def _check_value_head_order(path: Path, modules: dict, config: ModelConfig) -> None:
    """A PEFT adapter orders Gated DeltaNet's value heads as the Hugging Face checkpoint does (grouped by key
    head); a Qwen3.5 GGUF model tiles them, and an adapter's rows and columns are not reordered to match."""
    tiled = config.linear_value_heads_tiled and config.linear_num_value_heads != config.linear_num_key_heads
    if tiled and any(".linear_attn." in module for module in modules):
        raise LoRAError(f"LoRA adapter {path}: it adapts Gated DeltaNet projections in the Hugging Face order of "
                        "value heads, which this GGUF model tiles; load the model from its Hugging Face checkpoint, "
                        "or convert the adapter with llama.cpp's convert_lora_to_gguf.py")


def _hf_rows(module: str, b: torch.Tensor, config: ModelConfig, family: FamilySpec,
             model_order: bool) -> Iterator[tuple[str, torch.Tensor]]:
    name = canonical_hf_name(f"{module}.weight", family)
    if family.hf_qkv_per_head and ".qkv_proj." in name:
        b = qkv_by_kind(b, config.num_attention_heads)
    return _placed_rows(name, b, config, family, model_order)


# -- llama.cpp GGUF LoRA ------------------------------------------------------------------------------
def _gguf_modules(path: Path, family: FamilySpec) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], int]:
    try:
        f = open_gguf(path)
    except GGUFError as exc:
        raise LoRAError(f"LoRA adapter: {exc}") from None
    if f.get("general.type") != "adapter" or f.get("adapter.type") != "lora":
        raise LoRAError(f"{path}: not a LoRA adapter (general.type {shown(f.get('general.type'))}, "
                        f"adapter.type {shown(f.get('adapter.type'))})")
    arch = f.get("general.architecture")
    if arch is not None and arch not in family.gguf_architectures:
        raise LoRAError(f"{path}: a LoRA adapter for {shown(arch)} models, not for this {family.name} model")
    from ..layers.dequant import dequantize

    found: dict[str, dict[str, torch.Tensor]] = {}
    for info in f.tensors.values():
        match = _GGUF_KEY.match(info.name)
        if match is None:
            raise LoRAError(f"{path}: unexpected tensor {shown(info.name)} (not a .lora_a / .lora_b)")
        found.setdefault(match["base"], {})[match["which"].upper()] = dequantize(
            f.tensor_bytes(info), info.ggml_type, info.shape)
    alpha = f.get("adapter.lora.alpha")
    if alpha is not None and not _positive_number(alpha):
        raise LoRAError(f"{path}: adapter.lora.alpha must be a positive finite number, got {shown(alpha)}")
    modules, rank = {}, 0
    for base, parts in found.items():
        a, b = _pair(path, base, parts.get("A"), parts.get("B"))
        r = a.shape[0]
        modules[base], rank = (a, b, (alpha / r) if alpha else 1.0), max(rank, r)  # llama.cpp: no alpha → scale 1
    return modules, rank


def _gguf_rows(base: str, b: torch.Tensor, config: ModelConfig, family: FamilySpec,
               model_order: bool) -> Iterator[tuple[str, torch.Tensor]]:
    name = canonical_name(base, family)
    if family.gguf_qk_permuted and (".q_proj." in name or ".k_proj." in name):
        b = unpermute_rows(b, config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads)
    return _placed_rows(name, b, config, family, model_order)


def _placed_rows(name: str, b: torch.Tensor, config: ModelConfig, family: FamilySpec,
                 model_order: bool) -> Iterator[tuple[str, torch.Tensor]]:
    if model_order:
        placed = model_rows([(name, b)], config, family)
    else:
        placed = split_fused([(name, b)], config) if family.fused_checkpoint else [(name, b)]
    for canonical, rows in placed:
        yield canonical.removesuffix(".weight"), rows
