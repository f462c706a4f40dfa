"""`pagedllm inspect`: probes layer by layer on a prompt, and the numerics diff against a reference."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ...errors import PagedLLMError
from .options import add_engine_args, engine_for


def add_parsers(sub) -> None:
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
    add_engine_args(probe)
    probe.set_defaults(kv_cache_memory=16 * 2**20, quantization="auto")  # the probe keeps its own small cache


def cmd_inspect(args: argparse.Namespace) -> int:
    from ...tools.inspect import compare_layers, inspect_model, load_reference
    from ...tools.probe_report import format_comparison, format_inspection, parse_layers, write_plots

    if len(args.words) > 2:
        raise PagedLLMError(f"expected [MODEL] PROMPT, got {len(args.words)} words (quote the prompt)")
    if len(args.words) == 2:
        args.model = args.words[0]
    layers = parse_layers(args.layers) if args.layers else None
    engine = engine_for(args)
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


COMMANDS = {"inspect": cmd_inspect}
