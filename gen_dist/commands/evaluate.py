"""`gen-dist eval`: a checkpoint, a run's snapshots or its post-hoc EMAs scored."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gen_dist.commands.options import eval_overrides, fail


def cmd_eval(args: argparse.Namespace) -> None:
    import torch

    from gen_dist import dist
    from gen_dist.launch import LaunchSpec, run

    overrides = eval_overrides(args)
    path = Path(args.checkpoint)
    if args.ema_stds and (args.snapshots or args.raw):
        fail("--ema-stds scores post-hoc EMAs of a run directory; it does not go with --snapshots or --raw")
    if args.nproc > 1:
        from gen_dist.evaluation import check_eval_target

        whole_run = "--snapshots" if args.snapshots else "--ema-stds" if args.ema_stds else ""
        check_eval_target(path, overrides, whole_run, not args.raw)  # fail before launch
        flags = [f"--{f}" for f in ("raw", "cpu", "snapshots") if getattr(args, f)]
        if args.ema_stds:
            from gen_dist import posthoc

            for std in args.ema_stds:
                posthoc.plan(path, std)
            flags += ["--ema-stds", ",".join(map(str, args.ema_stds))]
        sys.exit(run(LaunchSpec(nproc=args.nproc, cpu=args.cpu, port=args.port), [args.checkpoint, *overrides,
                                                                                  *flags], command="eval"))
    evaluate_here(args, path, overrides)
    if torch.distributed.is_initialized():
        # As after training: the process group closed in order and the interpreter's teardown skipped (tearing
        # gloo down at exit occasionally aborts a rank after its work is done).
        dist.shutdown(None)
        dist.hard_exit(0)


def evaluate_here(args: argparse.Namespace, path: Path, overrides: list[str]) -> None:
    """The evaluation in this process (one rank of a launch, or alone)."""
    from gen_dist import dist
    from gen_dist.evaluation import evaluate_checkpoint, evaluate_snapshots

    if args.ema_stds:
        from gen_dist.evaluation import evaluate_posthoc

        rows, best = evaluate_posthoc(path, args.ema_stds, overrides, cpu=args.cpu)
        print_scores("ema std", [(f"{std:.3f}", scores) for std, scores in rows])
        dist.print0(f"best: ema std {best} (wrote {path / 'eval' / 'posthoc.json'})")
        return
    if args.snapshots:
        curve = evaluate_snapshots(path, overrides, use_ema=not args.raw, cpu=args.cpu)
        print_scores("step", [(str(step), scores) for step, scores in curve])
        dist.print0(f"wrote {path / 'eval' / 'snapshots.json'}")
        return
    report, out = evaluate_checkpoint(path, overrides, use_ema=not args.raw, cpu=args.cpu)
    for key, value in report["scores"].items():
        dist.print0(f"{key:<32} {value:.6g}")
    for note in report["skipped"]:
        dist.print0(f"not computed: {note}")
    dist.print0(f"wrote {out}")


def print_scores(label: str, rows: list[tuple[str, dict[str, float]]]) -> None:
    """One line of scores per evaluated model (a snapshot's step, a post-hoc EMA length), on the main rank."""
    from gen_dist import dist

    keys = [k for k in rows[0][1] if k != "eval/seconds"]
    dist.print0(f"{label:<9} " + "  ".join(f"{k.removeprefix('eval/'):>18}" for k in keys))
    for name, scores in rows:
        dist.print0(f"{name:<9} " + "  ".join(f"{scores.get(k, float('nan')):>18.6g}" for k in keys))
