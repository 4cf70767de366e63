"""`gen-dist status` and `gen-dist plot`: a run directory read from its files alone."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any


def cmd_status(args: argparse.Namespace) -> None:
    from gen_dist import monitor

    run_dir = Path(args.run)
    if args.watch is None:
        print(monitor.format_status(monitor.status(run_dir)))
        return
    try:
        monitor.watch(run_dir, args.watch)
    except KeyboardInterrupt:  # the usual way to stop watching: not an error
        print(file=sys.stderr)


def cmd_plot(args: argparse.Namespace) -> None:
    from gen_dist import monitor

    print(f"wrote {monitor.plot(Path(args.run), Path(args.out))}")


def interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def add_parsers(sub: Any) -> None:
    """The status and plot subcommands, on the subparsers of `gen-dist`."""
    s = sub.add_parser("status", help="progress, losses, checkpoints and liveness of a run directory",
                       description="Report a run directory: step of total, speed and ETA, latest losses and "
                                   "eval scores, newest checkpoint and sample grid, restarts and data problems "
                                   "so far, and whether the run is alive (heartbeat.json; SLURM job state "
                                   "where it ran under SLURM).")
    s.add_argument("run", help="run directory, e.g. runs/diffusion_fashion_mnist")
    s.add_argument("--watch", nargs="?", const=10.0, type=interval, metavar="SECONDS",
                   help="reprint every SECONDS (default 10) until the run is no longer alive")
    s.set_defaults(func=cmd_status)
    p = sub.add_parser("plot", help="plot a run's losses, learning rates, throughput and eval metrics",
                       description="Draw the curves of a run's metrics.jsonl against the step into one PNG.")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", required=True, help="output image, e.g. curves.png")
    p.set_defaults(func=cmd_plot)
