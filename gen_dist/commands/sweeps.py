"""`gen-dist sweep`: run, resume and report a hyperparameter sweep; `sweep worker` inside a SLURM array."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gen_dist.commands.options import fail


def cmd_sweep(args: argparse.Namespace) -> None:
    from gen_dist import sweep

    if args.sweep == "status":
        if not args.sweep_dir:
            fail("gen-dist sweep status SWEEP_DIR [--plot out.png]")
        print(sweep.format_status(Path(args.sweep_dir)))
        if args.plot:
            print(f"wrote {sweep.plot(Path(args.sweep_dir), Path(args.plot))}")
        return
    if args.sweep == "worker":
        sweep_worker(args)
        return
    if args.sweep_dir or args.plot:
        fail("gen-dist sweep SWEEP.yaml [--workers K] [--nproc N] runs a sweep; `gen-dist sweep status DIR` shows one")
    import torch

    from gen_dist.launch import cpu_threads

    s = sweep.load_sweep(Path(args.sweep))
    # On CPUs the trials share the cores: each process gets its part instead of all of them.
    cpu = args.cpu or not torch.cuda.is_available()
    threads = cpu_threads(args.workers * args.nproc) if cpu else 0
    sweep.run_local(s, args.workers, sweep.Launch(nproc=args.nproc, cpu=args.cpu, threads=threads))
    print(sweep.format_status(s.dir))


def sweep_worker(args: argparse.Namespace) -> None:
    """`gen-dist sweep worker SWEEP_DIR`: one task of the job array `gen-dist slurm sweep` submits. It runs the
    sweep kept in SWEEP_DIR, each trial on all the nodes of its allocation, and exits with REQUEUE_EXIT after
    stopping a trial at a checkpoint, so that the job script requeues it."""

    from gen_dist import sweep

    if not args.sweep_dir:
        fail("gen-dist sweep worker SWEEP_DIR [--nproc N] [--cpu] (run by slurm/sweep.sbatch)")
    if not os.environ.get("SLURM_JOB_ID"):
        fail("gen-dist sweep worker runs inside a SLURM job (gen-dist slurm sweep); on one machine use "
              "gen-dist sweep SWEEP.yaml --workers K")
    sweep_dir = Path(args.sweep_dir)
    s = sweep.load_kept(sweep_dir)
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or 0)
    threads = max(1, cpus // args.nproc) if args.cpu and cpus else 0
    if sweep.run_local(s, 1, sweep.Launch(nproc=args.nproc, cpu=args.cpu, threads=threads, slurm=True)):
        sys.exit(sweep.REQUEUE_EXIT)
    print(sweep.format_status(s.dir))
