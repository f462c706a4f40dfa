"""Model families as data. A new family is a FamilySpec here, not new model code.

A spec says which shared parts a family uses (biases, norms, q/k norms, activation, embedding
scale, windows) and how llama.cpp stores it (tensor names, rotary row order, norm offsets); the
numbers of one model (sizes, eps, rope bases, caps) live in its ModelConfig.
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
    example: str = ""  # a model of the family on the Hugging Face hub (for the README's table)
    attention_bias: bool = False  # q/k/v projections carry a bias
    sliding_window: bool = False  # the HF config's `sliding_window` applies to every layer
    # llama.cpp's converter reorders the rows of Q and K for its "normal" (interleaved) rope
    # on some architectures; the GGUF loader undoes it for those.
    gguf_qk_permuted: bool = True
    # The parts a family chooses (see ModelConfig).
    norm_offset: float = 0.0  # Gemma's (1 + w); llama.cpp's converter stores such norms with the 1 added
    qk_norm: bool = False
    sandwich_norms: bool = False
    scale_embeddings: bool = False  # embeddings × √hidden
    hidden_act: str = "silu"  # what GGUF files imply; a Hugging Face config names its own
    # llama.cpp tensor names that mean something else in this family (llama.cpp name, HF name).
    gguf_renames: tuple[tuple[str, str], ...] = ()
    # llama.cpp's default sliding-window pattern for the architecture (every n-th layer global), when
    # a file has a window and no pattern key; 0: every layer is windowed.
    gguf_swa_pattern: int = 0
    gguf_local_rope_theta: float | None = None  # llama.cpp's windowed-layer rope base, when the file has none
    # llama.cpp scales a model of this many layers' queries by (hidden / heads) ** -0.5, not head_dim's
    # (Gemma 2/3 27B, after gemma_pytorch).
    gguf_hidden_scale_layers: int = 0
    # The checkpoint stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj` (Phi-3); the
    # loaders split them into the canonical names.
    fused_checkpoint: bool = False

    def model_parts(self) -> dict[str, object]:
        """The ModelConfig fields the family fixes, whatever its checkpoint says."""
        return {"norm_offset": self.norm_offset, "qk_norm": self.qk_norm, "sandwich_norms": self.sandwich_norms}


# Gemma 2/3: llama.cpp's ffn_norm is the norm before the MLP, two more follow the sub-layers.
_GEMMA_SANDWICH = (("ffn_norm", "pre_feedforward_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
                   ("post_ffw_norm", "post_feedforward_layernorm"))

FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        name="llama",
        # SmolLM2, Llama 2/3, Yi, DeepSeek dense and Vicuna all ship as LlamaForCausalLM.
        hf_architectures=("LlamaForCausalLM", "YiForCausalLM"),
        gguf_architectures=("llama",),
        example="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    FamilySpec(
        name="qwen2",
        hf_architectures=("Qwen2ForCausalLM",),
        gguf_architectures=("qwen2",),
        example="Qwen/Qwen2.5-0.5B-Instruct",
        attention_bias=True,
        gguf_qk_permuted=False,  # llama.cpp runs qwen2 with NEOX rope: rows stay in HF order
    ),
    FamilySpec(
        name="mistral",
        # llama.cpp writes Mistral models as GGUF architecture "llama" (+ a sliding-window key).
        hf_architectures=("MistralForCausalLM",),
        example="mistralai/Mistral-7B-Instruct-v0.3",
        sliding_window=True,
    ),
    FamilySpec(
        name="qwen3",
        hf_architectures=("Qwen3ForCausalLM",),
        gguf_architectures=("qwen3",),
        example="Qwen/Qwen3-0.6B",
        gguf_qk_permuted=False,
        qk_norm=True,
    ),
    FamilySpec(
        name="phi3",
        hf_architectures=("Phi3ForCausalLM",),
        gguf_architectures=("phi3",),
        example="microsoft/Phi-3-mini-4k-instruct",
        sliding_window=True,
        gguf_qk_permuted=False,
        fused_checkpoint=True,
        gguf_renames=(("attn_qkv", "self_attn.qkv_proj"), ("ffn_up", "mlp.gate_up_proj")),
    ),
    FamilySpec(
        name="gemma",
        hf_architectures=("GemmaForCausalLM",),
        gguf_architectures=("gemma",),
        example="google/gemma-2b-it",
        gguf_qk_permuted=False,
        norm_offset=1.0,
        scale_embeddings=True,
        hidden_act="gelu_tanh",
    ),
    FamilySpec(
        name="gemma2",
        hf_architectures=("Gemma2ForCausalLM",),
        gguf_architectures=("gemma2",),
        example="google/gemma-2-2b-it",
        gguf_qk_permuted=False,
        norm_offset=1.0,
        sandwich_norms=True,
        scale_embeddings=True,
        hidden_act="gelu_tanh",
        gguf_renames=_GEMMA_SANDWICH,
        gguf_swa_pattern=2,
        gguf_hidden_scale_layers=46,
    ),
    FamilySpec(
        name="gemma3",
        hf_architectures=("Gemma3ForCausalLM",),
        gguf_architectures=("gemma3",),
        example="google/gemma-3-1b-it",
        gguf_qk_permuted=False,
        norm_offset=1.0,
        qk_norm=True,
        sandwich_norms=True,
        scale_embeddings=True,
        hidden_act="gelu_tanh",
        gguf_renames=_GEMMA_SANDWICH,
        gguf_swa_pattern=6,
        gguf_local_rope_theta=10000.0,
        gguf_hidden_scale_layers=62,
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
