"""`gen-dist train` and `gen-dist launch`."""

from __future__ import annotations

import argparse
import sys


def cmd_train(args: argparse.Namespace) -> None:
    from gen_dist import dist
    from gen_dist.config import load_config
    from gen_dist.engine import Trainer
    from gen_dist.sweep import TrialLink

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg, supervisor=TrialLink.from_env())
    state = trainer.train()
    if trainer.stopped:
        dist.print0(f"stopped by {trainer.stopped} after step {state.step} with a checkpoint; the same command "
                    f"resumes it from {cfg.out_dir}")
    else:
        dist.print0(f"done: step {state.step}, run directory {cfg.out_dir}")
    dist.shutdown(trainer.acc)
    dist.hard_exit(0)


def cmd_launch(args: argparse.Namespace) -> None:
    from gen_dist.config import load_config
    from gen_dist.launch import LaunchSpec, launch_command, run
    from gen_dist.preflight import preflight, training_catalogs

    cfg = load_config(args.config, args.overrides)
    preflight(cfg, (args.nproc or 1) * args.num_machines, training_catalogs(cfg))
    spec = LaunchSpec(nproc=args.nproc, num_machines=args.num_machines, machine_rank=args.machine_rank,
                      main_ip=args.main_ip, port=args.port, cpu=args.cpu or cfg.train.cpu,
                      accelerate_config=args.accelerate_config or "", mixed_precision=cfg.train.mixed_precision,
                      strategy=cfg.parallel.strategy)
    train_args = [args.config, *args.overrides]
    if args.dry_run:
        cmd, env = launch_command(spec, train_args)
        print(" ".join([*(f"{k}={v}" for k, v in env.items()), *cmd]))
        return
    sys.exit(run(spec, train_args))
