"""`pagedllm generate` (continue a prompt) and `pagedllm chat` (interactive, or one --message), streaming tokens."""

from __future__ import annotations

import argparse
import sys
import time

from .options import add_engine_args, add_sampling_args, engine_for, sampling_params


def add_parsers(sub) -> None:
    gen = sub.add_parser("generate", help="continue a prompt, streaming tokens as they come")
    gen.add_argument("prompt")
    add_engine_args(gen)
    add_sampling_args(gen, max_tokens=128)
    chat = sub.add_parser("chat", help="chat with the model (interactive, or one --message)")
    chat.add_argument("--message", default=None, help="send one message, print the answer and exit")
    chat.add_argument("--system", default=None, help="a system prompt")
    add_engine_args(chat)
    add_sampling_args(chat, max_tokens=512)


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
    params = sampling_params(args)
    engine = engine_for(args)
    stream(engine, "generate", args.prompt, params)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    started = time.monotonic()
    engine = engine_for(args)
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


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat}
