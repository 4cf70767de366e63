"""Command-line option types and the options several commands share, turned into config overrides."""

from __future__ import annotations

import argparse
import math
import sys
from typing import TYPE_CHECKING, NoReturn

from gen_dist.schema import ConfigError

if TYPE_CHECKING:
    from gen_dist.slurm import JobSpec


def at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
    return value


def count(text: str) -> int:
    """argparse type of a count: an integer >= 1."""
    return at_least(text, 1)


def natural(text: str) -> int:
    """argparse type of an integer >= 0 (0 where it means 'default' or 'none')."""
    return at_least(text, 0)


def finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def stds(text: str) -> list[float]:
    return [finite(v) for v in text.split(",") if v.strip()]


def sampler_overrides(args: argparse.Namespace) -> list[str]:
    """--guidance, --sampler and --steps as diffusion.* overrides."""
    named = {"guidance": "diffusion.guidance", "sampler": "diffusion.sampler", "steps": "diffusion.sample_steps"}
    return [f"{key}={getattr(args, opt)}" for opt, key in named.items() if getattr(args, opt) is not None]


def add_sampler_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guidance", type=finite, help="diffusion: classifier-free guidance scale (1 = none)")
    p.add_argument("--sampler", help="diffusion: dpm++, dpm++_sde, ddim, euler, euler_a or heun (objective=ddpm); "
                                     "euler or heun (flow, edm)")
    p.add_argument("--steps", type=count, help="diffusion: sampler steps")


def eval_overrides(args: argparse.Namespace) -> list[str]:
    named = {"metrics": "eval.metrics", "extractors": "eval.extractors", "n": "eval.n", "split":
             "eval.reference_split", "reference_n": "eval.reference_n", "seed": "eval.seed",
             "batch_size": "eval.batch_size"}
    out = []
    for opt, key in named.items():
        value = getattr(args, opt)
        if value is not None:
            out.append(f"{key}=[{value}]" if opt in ("metrics", "extractors") else f"{key}={value}")
    return [*out, *sampler_overrides(args), *args.overrides]


def add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides (eval.*, data.path)")
    p.add_argument("--metrics", help="comma-separated: fid,kid,is,pr,accuracy,clip_score (default: the run's "
                                     "eval.metrics)")
    p.add_argument("--extractors", help="comma-separated: inception and/or a classifier run directory")
    p.add_argument("--n", type=count, help="generated samples (default: the run's eval.n)")
    p.add_argument("--split", help="reference split of the dataset (default: the run's, test)")
    p.add_argument("--reference-n", type=natural, help="real images for the reference (default: the whole split)")
    p.add_argument("--seed", type=natural)
    p.add_argument("--batch-size", type=count, help="images generated and embedded at once per process")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    add_sampler_options(p)
    p.add_argument("--snapshots", action="store_true",
                   help="score every snapshot of the run directory (train.snapshot_every); the curve goes to "
                        "RUN/eval/snapshots.json and to the run's logs as snapshots/*")


def add_job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus-per-node", type=natural, default=0, help="0 = a CPU job (gloo)")
    p.add_argument("--nproc-per-node", type=natural, default=0,
                   help="processes per node (default: one per GPU, 1 on CPU)")
    p.add_argument("--cpus-per-task", type=natural, default=0, help="CPUs for each node's task (all its ranks)")
    for opt in ("partition", "account", "qos", "time", "constraint", "mem", "job-name"):
        p.add_argument(f"--{opt}", default="", help=f"sbatch --{opt}")
    p.add_argument("--setup", default="", help="bash file sourced by the job first (module load, venv, conda)")
    p.add_argument("--python", default=sys.executable, help="interpreter gen_dist is installed in on the nodes")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="further sbatch option, repeatable (e.g. --sbatch-arg=--exclusive)")
    p.add_argument("--dry-run", action="store_true", help="print the job script instead of submitting it")


def job_spec(args: argparse.Namespace) -> JobSpec:
    from gen_dist.slurm import JobSpec

    return JobSpec(nodes=getattr(args, "nodes", 1), gpus_per_node=args.gpus_per_node,
                   nproc_per_node=args.nproc_per_node, cpus_per_task=args.cpus_per_task, partition=args.partition,
                   account=args.account, qos=args.qos, time=args.time, constraint=args.constraint, mem=args.mem,
                   job_name=args.job_name, signal_seconds=getattr(args, "signal_seconds", 120), setup=args.setup,
                   python=args.python, sbatch_args=args.sbatch_arg)


def fail(msg: str) -> NoReturn:
    """A usage error: `gen-dist: error: MSG` and exit code 2, as argparse reports its own."""
    raise ConfigError(msg)
