"""Model families as data. A new llama-family model is a FamilySpec here, not new model code.

A spec says what differs between families (biases, sliding window, how llama.cpp stored the
rotary projections); the numbers of one model (sizes, eps, rope base) live in its ModelConfig.
"""

from __future__ import annotations

from ..errors import PagedLLMError

from dataclasses import dataclass


class UnsupportedModelError(PagedLLMError, ValueError):
    """The model's architecture is not one pagedllm knows."""


@dataclass(frozen=True)
class FamilySpec:
    name: str
    hf_architectures: tuple[str, ...]
    gguf_architectures: tuple[str, ...] = ()
    attention_bias: bool = False  # q/k/v projections carry a bias
    sliding_window: bool = False  # the HF config's `sliding_window` applies to every layer
    # llama.cpp's converter reorders the rows of Q and K for its "normal" (interleaved) rope
    # on some architectures; the GGUF loader undoes it for those.
    gguf_qk_permuted: bool = True


FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        name="llama",
        # SmolLM2, Llama 2/3, Yi, DeepSeek dense and Vicuna all ship as LlamaForCausalLM.
        hf_architectures=("LlamaForCausalLM", "YiForCausalLM"),
        gguf_architectures=("llama",),
    ),
    FamilySpec(
        name="qwen2",
        hf_architectures=("Qwen2ForCausalLM",),
        gguf_architectures=("qwen2",),
        attention_bias=True,
        gguf_qk_permuted=False,  # llama.cpp runs qwen2 with NEOX rope: rows stay in HF order
    ),
    FamilySpec(
        name="mistral",
        # llama.cpp writes Mistral models as GGUF architecture "llama" (+ a sliding-window key).
        hf_architectures=("MistralForCausalLM",),
        sliding_window=True,
    ),
)


def _supported(kind: str) -> str:
    names = sorted({a for f in FAMILIES for a in (f.hf_architectures if kind == "hf" else f.gguf_architectures)})
    return ", ".join(names)


def family_for_hf(architectures: list[str] | None) -> FamilySpec:
    for arch in architectures or []:
        for family in FAMILIES:
            if arch in family.hf_architectures:
                return family
    raise UnsupportedModelError(
        f"unsupported architecture {', '.join(architectures or ['(none given)'])}; "
        f"pagedllm supports: {_supported('hf')}"
    )


def family_for_gguf(architecture: str) -> FamilySpec:
    for family in FAMILIES:
        if architecture in family.gguf_architectures:
            return family
    raise UnsupportedModelError(
        f"unsupported GGUF architecture {architecture!r}; pagedllm supports: {_supported('gguf')}"
    )


def family_by_name(name: str) -> FamilySpec:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UnsupportedModelError(f"unknown family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")
