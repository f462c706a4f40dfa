"""`pagedllm generate | chat | serve | infer | inspect | convert | train | memory`: thin front ends over the
engine, one module per command (each: `add_parsers(sub)` and its `COMMANDS`); options.py holds the shared
flags."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from ...errors import PagedLLMError
from . import convert, generate, infer, inspect, memory, serve, train
from .options import parse_bytes  # noqa: F401  (part of this package's API)

_MODULES = (generate, serve, infer, inspect, convert, train, memory)  # the order `pagedllm --help` lists them
COMMANDS = {name: command for module in _MODULES for name, command in module.COMMANDS.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedllm", description="LLM inference over a paged KV cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _MODULES:
        module.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)  # (serve's uvicorn takes SIGTERM over for its graceful shutdown)
    try:
        return COMMANDS[args.command](args)
    except PagedLLMError as exc:
        print(f"pagedllm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _stop(signum: int, frame) -> None:
    """SIGTERM stops a command the way Ctrl-C does: a batch job records where it stopped, workers are
    closed, and the command exits within seconds."""
    raise KeyboardInterrupt
