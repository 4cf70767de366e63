"""`gen-dist slurm submit`, `submit-eval` and `sweep`."""

from __future__ import annotations

import argparse

from gen_dist.commands.options import eval_overrides, job_spec


def cmd_slurm_submit(args: argparse.Namespace) -> None:
    from gen_dist.slurm import render, submit

    script, run_dir = render(args.config, args.overrides, job_spec(args))
    if args.dry_run:
        print(script, end="")
        return
    print(submit(script, run_dir))


def cmd_slurm_submit_eval(args: argparse.Namespace) -> None:
    from gen_dist.slurm import render_eval, submit

    flags = [f"--{f}" for f in ("raw", "snapshots") if getattr(args, f)]
    script, run_dir = render_eval(args.target, [*eval_overrides(args), *flags], job_spec(args))
    if args.dry_run:
        print(script, end="")
        return
    print(submit(script, run_dir, "eval/job.sbatch"))


def cmd_slurm_sweep(args: argparse.Namespace) -> None:
    from gen_dist.slurm import render_sweep, submit
    from gen_dist.sweep import prepare

    script, s = render_sweep(args.sweep, args.array, job_spec(args))
    if args.dry_run:
        print(script, end="")
        return
    prepare(s)
    (s.dir / "slurm").mkdir(exist_ok=True)  # sbatch writes the tasks' logs there and does not make it
    print(submit(script, s.dir.resolve(), "slurm/sweep.sbatch"))
    print(f"sweep folder {s.dir}; gen-dist sweep status {s.dir}")
