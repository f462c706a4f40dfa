"""The flags several commands share (engine, sampling, sizes) and what they become: an EngineConfig, an
engine, SamplingParams."""

from __future__ import annotations

import argparse
import re

from ...config import ATTENTION_BACKENDS, DTYPES, KV_CACHE_DTYPES, QUANTIZATION_CHOICES, SPECULATIVE_METHODS
from ...errors import PagedLLMError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_bytes(text: str) -> int:
    """'4GiB', '512MiB', '2G', '1000000' → bytes (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 4GiB, 512MiB, 1000000)")
    value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least one byte")
    return int(value)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="a .gguf file, a Hugging Face folder or repo id (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--kv-cache-memory", type=parse_bytes, default="512MiB", help="KV pool budget (default 512MiB)")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="KV pool element type (auto, the default: float16 for packed weights on the CPU, the model's "
                        "dtype otherwise); 16-bit halves the pool per token, q8_0 (8-bit blocks, as llama.cpp's) "
                        "nearly quarters it")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--max-model-len", type=int, default=None, help="context cap (default: the model's)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget per step")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences per step")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="do not reuse KV blocks of shared prompt prefixes")
    p.add_argument("--state-snapshot-interval", type=int, default=16, metavar="BLOCKS",
                   help="hybrid models' prefix cache: save the recurrent states every this many blocks of a prompt "
                        "(default 16), besides its last block and each block a sequence decodes past")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over this many processes (gloo on the CPU, NCCL on GPUs: rank r on cuda:r)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="on a GPU, run every step eagerly (default: decode steps replay CUDA graphs captured at start)")
    p.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                   help="auto (default): the best that runs here (cpu: the C++ decode kernel, on the CPU when it "
                        "builds); torch: plain torch ops on any device")
    p.add_argument("--quantization", choices=QUANTIZATION_CHOICES, default="auto",
                   help="auto (default): GGUF weights run in their packed formats, Hugging Face weights in float; "
                        "none: all float; int8 / int4: quantise Hugging Face weights at load (Q8_0 / Q4_1 blocks)")
    p.add_argument("--speculative-method", choices=SPECULATIVE_METHODS, default=None,
                   help="draft tokens for greedy requests, checked in one pass (ngram: prompt lookup; "
                        "draft_model: --speculative-model guesses)")
    p.add_argument("--speculative-model", default=None,
                   help="a smaller model with the same vocabulary that drafts tokens (implies draft_model)")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--enable-lora", action="store_true",
                   help="serve LoRA adapters (implied by --lora-modules); decode then skips the fused C++ layer")
    p.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                   help="LoRA adapters to load at start: a PEFT folder or a llama.cpp GGUF LoRA, each under a name "
                        "that requests pick as their model")
    p.add_argument("--max-loras", type=int, default=4, help="LoRA adapters loaded at once (default 4)")
    p.add_argument("--max-lora-rank", type=int, default=64, help="the largest LoRA rank accepted (default 64)")


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--sample-seed", type=int, default=None, help="seed of this request's sampling")
    p.add_argument("--min-tokens", type=int, default=0, help="no EOS / stop id before this many tokens")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeat for more)")
    p.add_argument("--beam-width", type=int, default=0, help="beam search with this many beams (needs temperature 0)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logprob sum / length ** this")
    p.add_argument("--penalty-alpha", type=float, default=0.0,
                   help="contrastive search among --top-k candidates with this degeneration penalty")


def engine_options(args: argparse.Namespace) -> dict:
    """build_engine_config's keyword arguments from the engine flags."""
    from ...config import SpeculativeConfig

    try:
        speculative = (SpeculativeConfig(args.speculative_method or "ngram", args.num_speculative_tokens,
                                         model=args.speculative_model)
                       if args.speculative_method or args.speculative_model else None)
    except ValueError as exc:
        raise PagedLLMError(str(exc)) from None
    return dict(device=args.device, dtype=args.dtype, seed=args.seed, attention_backend=args.attention_backend,
                quantization=args.quantization, speculative_config=speculative, block_size=args.block_size, kv_cache_memory=args.kv_cache_memory,
                kv_cache_dtype=args.kv_cache_dtype,
                enable_prefix_caching=args.enable_prefix_caching, max_num_batched_tokens=args.max_num_batched_tokens,
                state_snapshot_interval=args.state_snapshot_interval,
                max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                tensor_parallel_size=args.tensor_parallel_size, enforce_eager=args.enforce_eager,
                enable_lora=args.enable_lora, lora_modules=lora_modules(args.lora_modules), max_loras=args.max_loras,
                max_lora_rank=args.max_lora_rank)


def lora_modules(specs: list[str]) -> dict[str, str]:
    modules = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise PagedLLMError(f"--lora-modules takes NAME=PATH, got {spec!r}")
        if name in modules:
            raise PagedLLMError(f"--lora-modules names {name!r} twice")
        modules[name] = path
    return modules


def engine_config(args: argparse.Namespace):
    from ...config import build_engine_config

    try:
        return build_engine_config(args.model, **engine_options(args))
    except ValueError as exc:
        raise PagedLLMError(str(exc)) from None


def engine_for(args: argparse.Namespace):
    from .. import create_engine

    return create_engine(engine_config(args))


def sampling_params(args: argparse.Namespace):
    from ...sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.sample_seed,
                          repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, stop=tuple(args.stop),
                          use_beam_search=args.beam_width > 0, best_of=args.beam_width or None,
                          length_penalty=args.length_penalty, penalty_alpha=args.penalty_alpha)
