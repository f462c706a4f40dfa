"""`pagedllm generate | chat | serve | infer | inspect | convert | memory | train`: thin front ends over LLMEngine."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..config import ATTENTION_BACKENDS
from ..errors import PagedLLMError
from .openai.reasoning import REASONING_FORMATS
from .openai.tool_calls import TOOL_FORMATS

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


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="a .gguf file, a Hugging Face folder or repo id (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--kv-cache-memory", type=parse_bytes, default="512MiB", help="KV pool budget (default 512MiB)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "float32", "float16", "bfloat16", "q8_0"], default="auto",
                   help="KV pool element type (auto, the default: the model's dtype); 16-bit halves the pool per "
                        "token, q8_0 (8-bit blocks, as llama.cpp's) nearly quarters it")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--max-model-len", type=int, default=None, help="context cap (default: the model's)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget per step")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences per step")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="do not reuse KV blocks of shared prompt prefixes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over this many processes (gloo on the CPU, NCCL on GPUs: rank r on cuda:r)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="on a GPU, run every step eagerly (default: decode steps replay CUDA graphs captured at start)")
    p.add_argument("--attention-backend", choices=list(ATTENTION_BACKENDS), default="auto",
                   help="auto (default): the best that runs here (cpu: the C++ decode kernel, on the CPU when it "
                        "builds); torch: plain torch ops on any device")
    p.add_argument("--quantization", choices=["auto", "none", "int8", "int4"], default="auto",
                   help="auto (default): GGUF weights run in their packed formats, Hugging Face weights in float; "
                        "none: all float; int8 / int4: quantise Hugging Face weights at load (Q8_0 / Q4_1 blocks)")
    p.add_argument("--speculative-method", choices=["ngram", "draft_model"], default=None,
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


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedllm", description="LLM inference over a paged KV cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="continue a prompt, streaming tokens as they come")
    gen.add_argument("prompt")
    _add_engine_args(gen)
    _add_sampling_args(gen, max_tokens=128)
    chat = sub.add_parser("chat", help="chat with the model (interactive, or one --message)")
    chat.add_argument("--message", default=None, help="send one message, print the answer and exit")
    chat.add_argument("--system", default=None, help="a system prompt")
    _add_engine_args(chat)
    _add_sampling_args(chat, max_tokens=512)
    serve = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    serve.add_argument("model_path", nargs="?", default=None, metavar="MODEL", help="same as --model")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' (default: $PAGEDLLM_API_KEY, else no key)")
    serve.add_argument("--served-model-name", default=None, help="the model name clients use (default: file name)")
    serve.add_argument("--max-waiting-requests", type=int, default=256, help="queue bound; beyond it: 503")
    serve.add_argument("--max-tokens-limit", type=int, default=4096, help="the most tokens a request may ask for")
    serve.add_argument("--data-parallel-size", type=int, default=1,
                       help="engine cores, each with the whole model and its own share of the CPUs; a request goes "
                            "to the core that most likely caches its prompt's beginning, else the least busy")
    serve.add_argument("--reasoning-parser", choices=["auto", "none", *REASONING_FORMATS], default="auto",
                       help="keep a reasoning model's thinking apart as reasoning_content (auto, the default: when "
                            "the chat template mentions <think> and </think>; none: never)")
    serve.add_argument("--tool-call-parser", choices=["auto", *TOOL_FORMATS], default="auto",
                       help="how the model writes tool calls (auto, the default: from the chat template's markers; "
                            "hermes when it has none, with the tools described in a system message)")
    serve.add_argument("--task", choices=["generate", "embed"], default="generate",
                       help="generate (default): every route; embed: an embedding model, /v1/embeddings only")
    serve.add_argument("--pooling", choices=["last", "mean"], default="last",
                       help="how /v1/embeddings reduces a prompt's final hidden states (default: the last token's, "
                            "as decoder embedding models such as Qwen3-Embedding are trained); always L2-normalised")
    serve.add_argument("--no-ui", dest="ui", action="store_false", help="no web page at / (the API only)")
    serve.add_argument("--allow-runtime-lora-updates", action="store_true",
                       help="let API clients load and unload LoRA adapters from this machine's files "
                            "(POST /v1/load_lora_adapter, /v1/unload_lora_adapter); off by default")
    serve.add_argument("--max-body-bytes", type=parse_bytes, default="1MiB", help="request body bound (default 1MiB)")
    serve.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    _add_engine_args(serve)
    infer = sub.add_parser("infer", help="answer every row of a JSONL file with N model replicas (resumable)")
    infer.add_argument("model_path", nargs="?", default=None, metavar="MODEL", help="same as --model")
    infer.add_argument("--input", "-i", required=True, help="JSONL rows: id, prompt or messages, sampling settings")
    infer.add_argument("--output", "-o", required=True,
                       help="JSONL records (appended; run the same command again to resume)")
    infer.add_argument("--workers", type=int, default=1, help="model replicas, each in its own process (default 1)")
    infer.add_argument("--devices", default=None,
                       help="comma-separated devices the replicas take in turn, e.g. cuda:0,cuda:1 (default: --device); "
                            "with --tensor-parallel-size N each replica takes the next N")
    infer.add_argument("--threads-per-worker", type=int, default=None,
                       help="CPU threads of each replica (default: this machine's cores split evenly)")
    infer.add_argument("--backend", choices=["local", "ray"], default="local",
                       help="local processes (default) or actors on a Ray cluster")
    infer.add_argument("--ray-address", default=None,
                       help="the Ray cluster to join (default: $RAY_ADDRESS, else a new local one)")
    infer.add_argument("--rows-in-flight", type=int, default=None,
                       help="rows handed to each replica at a time (default: 2 x --max-num-seqs)")
    infer.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _add_engine_args(infer)
    _add_sampling_args(infer, max_tokens=256)
    probe = sub.add_parser("inspect", help="look inside the model layer by layer on a prompt (probes)")
    probe.add_argument("words", nargs="+", metavar="[MODEL] PROMPT", help="the model (optional) and the prompt")
    probe.add_argument("--layers", default=None, help="layers to probe, e.g. 0,3,5-7 (default: all)")
    probe.add_argument("--top-k", type=int, default=5, help="logit-lens tokens per layer (default 5)")
    probe.add_argument("--attention", action="append", default=[], metavar="L:H:i:j",
                       help="attention weights of layer L, head H, query token i, key token j (* or left out: all; "
                            "negative tokens count from the end); repeat for more")
    probe.add_argument("--diff", default=None, metavar="REFERENCE",
                       help="numerics diff per layer against transformers (the same Hugging Face folder), float "
                            "(this model's float path) or another checkpoint's path")
    probe.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user message")
    probe.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    probe.add_argument("--plot", default=None, metavar="DIR", help="write PNGs: layer curves, attention heatmaps")
    _add_engine_args(probe)
    probe.set_defaults(kv_cache_memory=16 * 2**20, quantization="auto")  # the probe keeps its own small cache
    conv = sub.add_parser("convert", help="write a model as another family's checkpoint, a GGUF file, or shards")
    conv.add_argument("source", metavar="SRC", help="a .gguf file, a Hugging Face folder or a shard set")
    conv.add_argument("--to", default=None, metavar="FAMILY",
                      help="the family to write (llama, mistral, qwen2, qwen3; default: the source's)")
    conv.add_argument("--out", required=True, metavar="DIR|FILE.gguf",
                      help="a folder (Hugging Face checkpoint) or a .gguf file")
    conv.add_argument("--quantize", default=None, metavar="TYPE",
                      help="the GGUF weight type: f32 (default), f16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, "
                           "q4_k_m, q5_k_m")
    conv.add_argument("--tp", type=int, default=1, help="split into this many tensor-parallel shards")
    conv.add_argument("--pp", type=int, default=1, help="split into this many pipeline stages")
    conv.add_argument("--merge", action="store_true", help="merge a shard set back into one checkpoint")
    conv.add_argument("--merge-lora", default=None, metavar="ADAPTER",
                      help="bake a LoRA adapter (PEFT folder or llama.cpp GGUF LoRA) into the weights, in float32 "
                           "(then quantised by --quantize where given)")
    _add_train_parser(sub)
    mem = sub.add_parser("memory", help="parameters, weight bytes and KV-cache bytes of a model")
    mem.add_argument("model", nargs="?", default=None)
    mem.add_argument("--budget", type=parse_bytes, default="4GiB", help="KV budget to fit tokens in (default 4GiB)")
    mem.add_argument("--train", choices=["full", "lora"], default=None,
                     help="also the memory of fine-tuning: every parameter, or LoRA adapters on every linear layer")
    mem.add_argument("--seq-len", type=int, default=2048, help="training sequence length (default 2048)")
    mem.add_argument("--batch", type=int, default=1, help="sequences per training step (default 1)")
    mem.add_argument("--optimizer", choices=["adamw", "adamw8bit", "sgd"], default="adamw")
    mem.add_argument("--train-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                     help="weights, gradients and activations (16-bit: with float32 master weights)")
    mem.add_argument("--lora-rank", type=int, default=16)
    mem.add_argument("--gradient-checkpointing", action="store_true",
                     help="keep each layer's input only and recompute the rest in the backward pass")
    return parser


def _add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="fine-tune (LoRA or every weight) on JSONL rows, a loss curve per channel")
    train.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                       help="a .gguf file or a Hugging Face folder (default: the default model)")
    train.add_argument("--data", default=None, help="JSONL rows: messages, or prompt and completion; optional channel")
    train.add_argument("--out", default=None, metavar="RUN_DIR",
                       help="the run folder: logs, checkpoints, and the adapter (LoRA) or model (full)")
    train.add_argument("--plot", default=None, metavar="RUN_DIR",
                       help="only draw RUN_DIR's per-channel loss curves to RUN_DIR/loss.png (or --plot-out)")
    train.add_argument("--plot-out", default=None, metavar="FILE.png")
    train.add_argument("--mode", choices=["lora", "full"], default="lora", help="LoRA adapters (default) or every weight")
    train.add_argument("--lora-rank", type=int, default=16)
    train.add_argument("--lora-alpha", type=float, default=32.0)
    train.add_argument("--lora-targets", default=None,
                       help="comma-separated layers to adapt, of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                            "down_proj (default: all of them)")
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    train.add_argument("--batch-size", type=int, default=4, help="rows per micro-batch on each process (default 4)")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    train.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4 LoRA, 1e-5 full)")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--lr-schedule", choices=["linear", "cosine", "constant"], default="linear")
    train.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: none)")
    train.add_argument("--max-length", type=int, default=1024, help="tokens kept of each row (default 1024)")
    train.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                       help="bf16: products in bfloat16 (autocast), trained weights kept in float32")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--log-every", type=int, default=1, help="optimizer steps between logged losses (default 1)")
    train.add_argument("--save-every", type=int, default=100, help="steps between checkpoints (0: at the end only)")
    train.add_argument("--keep-checkpoints", type=int, default=2)
    train.add_argument("--nproc", type=int, default=1,
                       help="data-parallel processes (torch.distributed: gloo on the CPU, NCCL on GPUs)")
    train.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    train.add_argument("--resume", action="store_true", help="go on from RUN_DIR's last checkpoint")


def _engine_options(args: argparse.Namespace) -> dict:
    """build_engine_config's keyword arguments from the engine flags."""
    from ..config import SpeculativeConfig

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
                max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                tensor_parallel_size=args.tensor_parallel_size, enforce_eager=args.enforce_eager,
                enable_lora=args.enable_lora, lora_modules=_lora_modules(args.lora_modules), max_loras=args.max_loras,
                max_lora_rank=args.max_lora_rank)


def _lora_modules(specs: list[str]) -> dict[str, str]:
    modules = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise PagedLLMError(f"--lora-modules takes NAME=PATH, got {spec!r}")
        if name in modules:
            raise PagedLLMError(f"--lora-modules names {name!r} twice")
        modules[name] = path
    return modules


def _engine_config(args: argparse.Namespace):
    from ..config import build_engine_config

    try:
        return build_engine_config(args.model, **_engine_options(args))
    except ValueError as exc:
        raise PagedLLMError(str(exc)) from None


def _engine(args: argparse.Namespace):
    from . import create_engine

    return create_engine(_engine_config(args))


def _sampling(args: argparse.Namespace):
    from ..sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.sample_seed,
                          repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, stop=tuple(args.stop),
                          use_beam_search=args.beam_width > 0, best_of=args.beam_width or None,
                          length_penalty=args.length_penalty, penalty_alpha=args.penalty_alpha)


def stream(engine, request_id: str, prompt, params, out=sys.stdout) -> str:
    """Run one request to the end, writing text as it is completed; returns the whole text."""
    engine.add_request(request_id, prompt, params)
    text = ""
    while engine.has_unfinished():
        for output in engine.step():
            out.write(output.delta_text)
            out.flush()
            text = output.text
    return text


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling(args)
    engine = _engine(args)
    stream(engine, "generate", args.prompt, params)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = _sampling(args)
    started = time.monotonic()
    engine = _engine(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    if args.message is not None:
        print(f"[pagedllm] {engine.source.name} ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
        print(f"> {args.message}")
        _chat_turn(engine, history, args.message, params, 0)
        return 0
    print(f"pagedllm chat with {engine.source.name}. /reset clears the history, /exit or Ctrl-D quits.")
    turn = 0
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            del history[bool(args.system):]
            continue
        if line:
            _chat_turn(engine, history, line, params, turn)
            turn += 1


def _chat_turn(engine, history: list[dict], message: str, params, turn: int) -> None:
    history.append({"role": "user", "content": message})
    prompt_ids = engine.tokenizer.encode_chat(history)
    answer = stream(engine, f"chat-{turn}", {"prompt_token_ids": prompt_ids}, params)
    print()
    history.append({"role": "assistant", "content": answer})


def cmd_memory(args: argparse.Namespace) -> int:
    from ..models.loaders import resolve_model
    from ..tools.memory import TrainingPlan, format_report, format_training, memory_report

    try:
        plan = TrainingPlan(args.train, args.seq_len, args.batch, args.optimizer, args.train_dtype, args.lora_rank,
                            args.gradient_checkpointing) if args.train else None
    except ValueError as exc:
        raise PagedLLMError(str(exc)) from None
    report = memory_report(resolve_model(args.model))
    print(format_report(report, args.budget))
    if plan is not None:
        print("\n" + format_training(report, plan))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..tools.inspect import compare_layers, inspect_model, load_reference
    from ..tools.probe_report import format_comparison, format_inspection, parse_layers, write_plots

    if len(args.words) > 2:
        raise PagedLLMError(f"expected [MODEL] PROMPT, got {len(args.words)} words (quote the prompt)")
    if len(args.words) == 2:
        args.model = args.words[0]
    layers = parse_layers(args.layers) if args.layers else None
    engine = _engine(args)
    prompt = args.words[-1]
    tokenizer = engine.tokenizer
    ids = tokenizer.encode_chat([{"role": "user", "content": prompt}]) if args.chat else tokenizer.encode(prompt)
    block = engine.kv_spec.block_size
    inspection = inspect_model(engine.model, ids, layers, args.top_k, block, args.attention)
    diff = None
    if args.diff:
        diff = compare_layers(engine.model, load_reference(engine.source, args.diff, args.device), ids, block)
    decode = lambda token: tokenizer.decode([token], skip_special_tokens=False)  # noqa: E731
    if args.json:
        body = inspection.as_json()
        if diff is not None:
            body["diff"] = diff.as_json()
        print(json.dumps(body))
    else:
        print(format_inspection(inspection, decode))
        if diff is not None:
            print("\n" + format_comparison(diff, args.diff))
    if args.plot:
        for path in write_plots(inspection, decode, Path(args.plot), diff):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ..models.loaders import resolve_model
    from ..tools.export import ConvertPlan, convert

    plan = ConvertPlan(args.to, args.quantize, args.tp, args.pp, args.merge, args.merge_lora)
    print(convert(resolve_model(args.source), Path(args.out), plan))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..training import TrainConfig, train
    from ..training.lora import TARGET_NAMES
    from ..training.run_log import plot_run

    if args.plot:
        print(f"wrote {plot_run(Path(args.plot), Path(args.plot_out) if args.plot_out else None)}")
        return 0
    if not args.data or not args.out:
        raise PagedLLMError("pagedllm train needs --data FILE.jsonl and --out RUN_DIR (or --plot RUN_DIR)")
    targets = TARGET_NAMES if args.lora_targets is None else tuple(
        t.strip() for t in args.lora_targets.split(",") if t.strip())
    config = TrainConfig(args.data, args.out, args.model_path, args.mode, args.lora_rank, args.lora_alpha, targets,
                         args.epochs, args.max_steps, args.batch_size, args.grad_accum, args.lr, args.weight_decay,
                         args.warmup_steps, args.lr_schedule, args.max_grad_norm, args.max_length, args.precision,
                         args.seed, args.log_every, args.save_every, args.keep_checkpoints, args.nproc, args.device,
                         args.resume)
    train(config)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .openai.server import ServerConfig, build_app

    args.model = args.model_path or args.model
    if not 0 <= args.port <= 65535:
        raise PagedLLMError(f"--port must be in [0, 65535], got {args.port}")
    for flag, value in (("--max-waiting-requests", args.max_waiting_requests),
                        ("--max-tokens-limit", args.max_tokens_limit), ("--data-parallel-size", args.data_parallel_size)):
        if value < 1:
            raise PagedLLMError(f"{flag} must be at least 1, got {value}")
    from . import create_engine_client

    client = create_engine_client(_engine_config(args), args.max_waiting_requests, args.data_parallel_size)
    name = args.served_model_name or Path(client.info.model_path).stem
    config = ServerConfig(name, args.api_key or os.environ.get("PAGEDLLM_API_KEY") or None,
                          args.max_waiting_requests, args.max_body_bytes, args.max_tokens_limit, args.task, args.pooling,
                          args.reasoning_parser, args.tool_call_parser, args.ui,
                          allow_runtime_lora_updates=args.allow_runtime_lora_updates)
    app = build_app(client, config, on_ready=lambda: print(_examples(args.host, args.port, config), flush=True))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _examples(host: str, port: int, config) -> str:
    base = f"http://{host}:{port}/v1"
    auth = f' -H "Authorization: Bearer {config.api_key}"' if config.api_key else ""
    body = json.dumps({"model": config.served_model_name, "messages": [{"role": "user", "content": "Hello!"}],
                       "max_tokens": 64})
    page = f"open http://{host}:{port}/ in a browser to chat, watch the engine and look inside the model\n\n"
    return (f"pagedllm is serving {config.served_model_name} at {base}\n\n" + (page if config.ui else "") +
            f"curl {base}/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'\n\n"
            f"python -c \"from openai import OpenAI; c = OpenAI(base_url='{base}', api_key='{config.api_key or 'none'}'); "
            f"print(c.chat.completions.create(model='{config.served_model_name}', max_tokens=64, "
            f"messages=[{{'role': 'user', 'content': 'Hello!'}}]).choices[0].message.content)\"\n")


def cmd_infer(args: argparse.Namespace) -> int:
    from .batch import infer

    devices = [d.strip() for d in args.devices.split(",")] if args.devices else [args.device]
    try:
        summary = infer(args.model_path or args.model, args.input, args.output, args.workers, devices=devices,
                        threads_per_worker=args.threads_per_worker, backend=args.backend,
                        ray_address=args.ray_address or os.environ.get("RAY_ADDRESS") or None,
                        sampling_params=_sampling(args), engine_options=_engine_options(args),
                        rows_in_flight=args.rows_in_flight, progress=args.progress)
    except ValueError as exc:  # an engine option out of range
        raise PagedLLMError(str(exc)) from None
    except KeyboardInterrupt:
        print(f"\ninterrupted: the rows finished so far are in {args.output}; run the same command to resume",
              file=sys.stderr)
        return 130
    print(summary.format(), file=sys.stderr)
    return 0


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "infer": cmd_infer, "inspect": cmd_inspect, "convert": cmd_convert,
            "memory": cmd_memory, "train": cmd_train}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except PagedLLMError as exc:
        print(f"pagedllm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
