"""Optional C++ kernels for the CPU, compiled on first use with torch.utils.cpp_extension.

The build needs a C++ compiler and ninja and takes ~10 s once; torch caches it (under
TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) and rebuilds when the source changes.
Without a compiler the engine keeps the plain-torch attention path, which computes the same thing,
more slowly.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

KERNEL_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)  # compiled-in head sizes (paged_attention.cpp)
_SOURCE = Path(__file__).with_name("paged_attention.cpp")
_SOURCE_HEADERS = [Path(__file__).with_name("simd_exp.h")]
# -march=native: the extension is built on the machine that runs it. -fopenmp: at::parallel_for is
# inlined here and is serial without it.
_FLAGS = ["-O3", "-std=c++20", "-march=native", "-ffast-math", "-fopenmp"]


def _cpu_fingerprint() -> bytes:
    """What a -march=native build depends on: the CPU's model and instruction-set flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine().encode() + platform.processor().encode()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return "\n".join(wanted).encode()


@functools.cache
def cpu_multiplies_bfloat16() -> bool:
    """Whether the CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX): then bf16 GEMMs beat float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


@functools.cache
def cpu_kernels_available() -> bool:
    """Build (or load the cached build of) the CPU kernels; False, with one warning, if that fails."""
    # -march=native code from another CPU can die of an illegal instruction: name the build by both.
    sources = b"".join(p.read_bytes() for p in [_SOURCE, *_SOURCE_HEADERS])
    digest = hashlib.sha1(sources + _cpu_fingerprint()).hexdigest()[:12]
    try:
        from torch.utils.cpp_extension import load

        load(f"pagedllm_cpu_kernels_{digest}", [str(_SOURCE)], is_python_module=False, extra_cflags=_FLAGS,
             verbose=False)
    except Exception as exc:  # a missing compiler or ninja must not stop the engine, only slow it
        log.warning("pagedllm CPU kernels unavailable, using the torch attention path: %s", exc)
        return False
    return True


@functools.cache
def decode_bfloat16_available() -> bool:
    """Whether the decode kernel was built with bfloat16 products (the CPU has AVX-512 BF16)."""
    return cpu_kernels_available() and torch.ops.pagedllm.decode_has_bf16()


def paged_decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, sliding_window: int | None,
                           softcap: float | None = None, alibi: torch.Tensor | None = None,
                           bfloat16: bool = False, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """One query per sequence against its cached K/V, read in place: [seqs, heads, dim] float32.
    `softcap`: scores soft-capped; `alibi`: per-head ALiBi slopes; `bfloat16`: the products in bfloat16
    where decode_bfloat16_available() and the head size is a multiple of 32, else float32; `sinks`: per-head
    attention-sink logits (float32)."""
    return torch.ops.pagedllm.paged_decode_attention(query, kv_cache, block_tables, context_lens, scale,
                                                     sliding_window or 0, softcap or 0.0, alibi, bfloat16, sinks)


# The quantised matmuls (and the fused prefill attention) carry every instruction-set path in one
# build (no -march=native) and pick one at run time, so their build does not depend on the CPU it was made on.
_QUANT_SOURCES = [Path(__file__).with_name(name) for name in (
    "quant_matmul.cpp", "decode_layer.cpp", "prefill_attention.cpp", "recurrent_layers.cpp", "quant_impl.h", "quant_kernels.h",
    "simd_exp.h", "prefill_impl.h", "recurrent_impl.h")]
_QUANT_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno"]
ISA_NAMES = ("portable", "avx2", "avx512vnni")


@functools.cache
def quant_kernels_available() -> bool:
    """Build (or load) the packed-weight kernels; False, with one warning, if that fails."""
    # The headers are part of the build but torch only hashes the compiled sources: name the build by all.
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in _QUANT_SOURCES)).hexdigest()[:12]
    try:
        from torch.utils.cpp_extension import load

        load(f"pagedllm_quant_{digest}", [str(p) for p in _QUANT_SOURCES if p.suffix == ".cpp"], is_python_module=False,
             extra_cflags=_QUANT_FLAGS, verbose=False)
    except Exception as exc:  # a missing compiler must not stop the engine; packed layers then refuse to run
        log.warning("pagedllm quantised CPU kernels unavailable: %s", exc)
        return False
    return True


@functools.cache
def best_isa() -> str:
    """The fastest kernel path this CPU runs, or the one PAGEDLLM_CPU_ISA names (for tests and comparisons)."""
    best = ISA_NAMES[torch.ops.pagedllm_quant.best_isa()]
    wanted = os.environ.get("PAGEDLLM_CPU_ISA", best)
    if wanted not in ISA_NAMES:
        raise ValueError(f"PAGEDLLM_CPU_ISA must be one of {', '.join(ISA_NAMES)}, got {wanted!r}")
    if ISA_NAMES.index(wanted) > ISA_NAMES.index(best):
        raise ValueError(f"PAGEDLLM_CPU_ISA={wanted}: this CPU only runs {', '.join(ISA_NAMES[:ISA_NAMES.index(best) + 1])}")
    return wanted


def best_isa_id() -> int:
    """best_isa() as the number the packed-weight ops take."""
    return ISA_NAMES.index(best_isa())


def available_isas() -> tuple[str, ...]:
    return ISA_NAMES[: torch.ops.pagedllm_quant.best_isa() + 1]


@functools.cache
def prefill_bfloat16_available() -> bool:
    """Whether the fused prefill kernel can take its products in bfloat16 (AVX-512 BF16)."""
    return quant_kernels_available() and torch.ops.pagedllm_quant.prefill_has_bf16()


def paged_prefill_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                            query_start: torch.Tensor, context_lens: torch.Tensor, scale: float,
                            sliding_window: int | None, softcap: float | None = None, alibi: torch.Tensor | None = None,
                            bfloat16: bool = False, isa: str | None = None,
                            sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Each sequence's new tokens (query [tokens, heads, dim] float32, sequence s's rows from query_start[s])
    against its cached K/V, read in place, in one fused pass (prefill_attention.cpp): [tokens, heads, dim].
    `bfloat16`: the products in bfloat16 (where prefill_bfloat16_available()), else float32; `isa`: an
    instruction-set path other than best_isa() (tests); `sinks`: per-head attention-sink logits (float32)."""
    # A tensor-parallel worker receives metadata built on rank 0: its own process loads the build here.
    if not quant_kernels_available():
        raise RuntimeError("the CPU kernels did not build: no fused prefill attention")
    return torch.ops.pagedllm_quant.prefill_attention(
        query.contiguous(), kv_cache, block_tables, query_start, context_lens, scale, sliding_window or 0,
        softcap or 0.0, alibi, bfloat16, ISA_NAMES.index(isa) if isa else best_isa_id(), sinks)


def delta_net_decode(proj: torch.Tensor, conv_weight: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor,
                     norm_weight: torch.Tensor, eps: float, conv_state: torch.Tensor, matrices: torch.Tensor,
                     slots: torch.Tensor, fresh: torch.Tensor, key_heads: int, tiled: bool,
                     isa: str | None = None) -> torch.Tensor:
    """Gated DeltaNet's decode step for sequences of one new token each (recurrent_layers.cpp): proj [seqs, q | k | v
    | z | b | a] float32 → [seqs, value heads · dv] float32, the normalised and gated output; the states in
    their slots (conv_state [slots, taps − 1, channels], matrices [slots, value heads, dk, dv]) advanced in
    place. `isa`: an instruction-set path other than best_isa() (tests)."""
    return torch.ops.pagedllm_quant.delta_net_decode(
        proj, conv_weight, a_log, dt_bias, norm_weight, eps, conv_state, matrices, slots, fresh, key_heads, tiled,
        ISA_NAMES.index(isa) if isa else best_isa_id())


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor,
                slots: torch.Tensor, fresh: torch.Tensor, query_start: torch.Tensor, silu: bool = False,
                isa: str | None = None) -> torch.Tensor:
    """The causal depthwise convolution (weight [channels, taps]) of each sequence's new inputs x [tokens,
    channels] float32 (sequence s's rows from query_start[s]), continuing from its last taps − 1 inputs
    in state [slots, taps − 1, channels] (zeros where `fresh`), which it updates in place
    (recurrent_layers.cpp); optionally through SiLU. `isa`: another instruction-set path (tests)."""
    return torch.ops.pagedllm_quant.causal_conv(x, weight, bias, state, slots, fresh, query_start, silu,
                                                ISA_NAMES.index(isa) if isa else best_isa_id())
