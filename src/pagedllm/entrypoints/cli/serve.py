"""`pagedllm serve`: the OpenAI-compatible server over engine cores in processes of their own."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ...errors import PagedLLMError
from ..openai.reasoning import REASONING_FORMATS
from ..openai.tool_calls import TOOL_FORMATS
from .options import add_engine_args, engine_config, parse_bytes

GRACEFUL_SHUTDOWN_S = 5  # seconds open streams get after SIGTERM


def add_parsers(sub) -> None:
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
    serve.add_argument("--lora-root", metavar="DIR",
                       help="with --allow-runtime-lora-updates: adapters load only from under DIR (lora_path is "
                            "relative to it; a path that resolves outside is refused before anything is read)")
    serve.add_argument("--max-body-bytes", type=parse_bytes, default="1MiB", help="request body bound (default 1MiB)")
    serve.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    add_engine_args(serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..openai.server import ServerConfig, build_app

    args.model = args.model_path or args.model
    if not 0 <= args.port <= 65535:
        raise PagedLLMError(f"--port must be in [0, 65535], got {args.port}")
    for flag, value in (("--max-waiting-requests", args.max_waiting_requests),
                        ("--max-tokens-limit", args.max_tokens_limit), ("--data-parallel-size", args.data_parallel_size)):
        if value < 1:
            raise PagedLLMError(f"{flag} must be at least 1, got {value}")
    from .. import create_engine_client

    client = create_engine_client(engine_config(args), args.max_waiting_requests, args.data_parallel_size)
    name = args.served_model_name or Path(client.info.model_path).stem
    config = ServerConfig(name, args.api_key or os.environ.get("PAGEDLLM_API_KEY") or None,
                          args.max_waiting_requests, args.max_body_bytes, args.max_tokens_limit, args.task, args.pooling,
                          args.reasoning_parser, args.tool_call_parser, args.ui,
                          allow_runtime_lora_updates=args.allow_runtime_lora_updates, lora_root=args.lora_root)
    app = build_app(client, config, on_ready=lambda: print(_examples(args.host, args.port, config), flush=True))
    # SIGTERM: open streams get GRACEFUL_SHUTDOWN_S to finish, then the server stops regardless.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
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


COMMANDS = {"serve": cmd_serve}
