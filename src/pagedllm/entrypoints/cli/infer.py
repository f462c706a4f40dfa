"""`pagedllm infer`: every row of a JSONL file through N model replicas, resumable."""

from __future__ import annotations

import argparse
import os
import sys

from ...errors import PagedLLMError
from .options import add_engine_args, add_sampling_args, engine_options, sampling_params


def add_parsers(sub) -> None:
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
    add_engine_args(infer)
    add_sampling_args(infer, max_tokens=256)


def cmd_infer(args: argparse.Namespace) -> int:
    from ..batch import infer

    devices = [d.strip() for d in args.devices.split(",")] if args.devices else [args.device]
    try:
        summary = infer(args.model_path or args.model, args.input, args.output, args.workers, devices=devices,
                        threads_per_worker=args.threads_per_worker, backend=args.backend,
                        ray_address=args.ray_address or os.environ.get("RAY_ADDRESS") or None,
                        sampling_params=sampling_params(args), engine_options=engine_options(args),
                        rows_in_flight=args.rows_in_flight, progress=args.progress)
    except ValueError as exc:  # an engine option out of range
        raise PagedLLMError(str(exc)) from None
    except KeyboardInterrupt:
        print(f"\ninterrupted: the rows finished so far are in {args.output}; run the same command to resume",
              file=sys.stderr)
        return 130
    print(summary.format(), file=sys.stderr)
    return 0


COMMANDS = {"infer": cmd_infer}
