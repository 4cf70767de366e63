"""`gen-dist` command line: train, launch, data, sample, export, eval, status, plot, slurm submit and submit-eval.
Thin: parse, then call library functions."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

TRAIN_HELP = """Train CONFIG in the current process group (plain python, accelerate launch or torchrun).
Overrides are dotted key=value pairs, e.g. train.steps=100 data.batch_size=32.
An existing run directory is resumed from its latest checkpoint.

Model families (config key `task`; each has its config section of the same name):
{families}"""

LAUNCH_HELP = """Validate CONFIG, then start `gen-dist train` on --nproc local processes through accelerate launch
(gloo on CPU, NCCL on GPUs). For several machines run it once per machine with --num-machines,
--machine-rank and --main-ip."""

DATA_HELP = """Pack images into WebDataset .tar shards plus index.json:
  idx DIR      every <split>-images-idx3-ubyte[.gz] with its labels file (t10k becomes 'test')
  folder DIR   a folder of images; class sub-folders become labels
  digits       scikit-learn's 8x8 digits (train/test)
  fashion-mnist   Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)
  latents RUN  --split of the dataset --data encoded by the autoencoder RUN (a run, checkpoint or export) into
               shards of the same layout, for latent diffusion's data.latents"""

SUBMIT_HELP = """Validate CONFIG for nodes x processes ranks, render slurm/train.sbatch (one task per node,
torchrun c10d rendezvous at the first node, SIGUSR1 before the time limit, requeue) and submit it with sbatch.
The run directory is fixed to an absolute path; a signalled job checkpoints, requeues itself and resumes.
Example: gen-dist slurm submit configs/x.yaml --nodes 4 --gpus-per-node 8 --time 24:00:00 --partition gpu"""

SUBMIT_EVAL_HELP = """Render slurm/eval.sbatch (one node; torchrun over --nproc-per-node ranks) for
`gen-dist eval TARGET` with the options given, and submit it with sbatch: evaluation as its own job, so that
training ranks never wait for it. The target and the evaluation settings are checked before submitting. The log goes to
RUN_DIR/eval/slurm-eval-<job>.out, the report where `gen-dist eval` writes it.
Example: gen-dist slurm submit-eval runs/x --snapshots --extractors inception --n 10000 --gpus-per-node 4"""

EVAL_HELP = """Score the samples of a checkpoint (or a run directory's latest, or an exported file) against a split
of its dataset. Settings come from the run's eval section; options and dotted overrides (eval.*, data.path)
replace them. --nproc N spreads sampling and feature extraction over N local processes (accelerate launch);
under torchrun or accelerate launch it uses the process group it is in. The report goes to
RUN_DIR/eval/<checkpoint>.json.
Example: gen-dist eval runs/x --metrics fid,kid,pr --n 10000 --extractors inception,runs/classifier"""

SWEEP_HELP = """Run a hyperparameter sweep: `gen-dist sweep SWEEP.yaml --workers K [--nproc N]` runs K trials at a
time, each an ordinary run (N processes) of the sweep's config with the sampled values of its space, in
SWEEP_DIR/trials/trial_NNNN. Running the same command again continues the sweep: finished trials are kept, an
interrupted one resumes from its own checkpoint. `gen-dist sweep status SWEEP_DIR [--plot out.png]` prints the
trials table and the best trial's command. The sweep file (docs/sweeps.md):
  name: lr_ema                          # the folder: runs/<name> (or dir: ...)
  config: configs/diffusion_fashion_mnist.yaml
  overrides: [train.steps=400, eval.every=200]
  space:
    optim.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
    diffusion.guidance: {type: categorical, choices: [1.5, 2.0, 3.0]}
  objective: {metric: eval/inception/fid1k, direction: minimize, at: last}   # at: last | best
  trials: 8
  sampler: tpe                          # tpe | random | grid; seed: 0
  pruner: median                        # none | median (fed by the in-training evaluations)"""

SLURM_SWEEP_HELP = """Check SWEEP.yaml (and its config on nodes x processes ranks), render slurm/sweep.sbatch as a job
array of --array tasks and sbatch it. Each task is a sweep worker: it takes trials one after another and runs
each on all its nodes (torchrun). A task stopped by --signal or scancel --signal=USR1 checkpoints its trial and
requeues itself; the requeued task resumes that trial, in the same run directory and W&B run. A trial whose
heartbeat stops for the sweep's stale_minutes is taken over by another task, or failed after `retries`.
Logs: SWEEP_DIR/slurm/slurm-<array job>_<task>.out; `gen-dist sweep status SWEEP_DIR` shows the trials.
Example: gen-dist slurm sweep configs/sweeps/x.yaml --array 8 --nodes 1 --gpus-per-node 8 --time 04:00:00"""

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class _FamiliesHelp(argparse.RawDescriptionHelpFormatter):
    """Lists the registered families where a description asks for them, when help is shown (reading the
    registry imports torch, which plain parsing does not need)."""

    def add_text(self, text: str | None) -> None:
        if text and "{families}" in text:
            from gen_dist.tasks import PLUGINS_ENV, families

            rows = [f"  {f.name:<12} {f.help}" for f in families().values()]
            rows.append(f"  (more from the modules named in {PLUGINS_ENV})")
            text = text.replace("{families}", "\n".join(rows))
        super().add_text(text)


def _fail(msg: str) -> None:
    print(f"gen-dist: error: {msg}", file=sys.stderr)
    sys.exit(2)


def cmd_train(args: argparse.Namespace) -> None:
    from gen_dist import dist
    from gen_dist.config import load_config
    from gen_dist.engine import Trainer

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
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
    from gen_dist.preflight import preflight

    cfg = load_config(args.config, args.overrides)
    preflight(cfg, world_size=max(1, args.nproc) * args.num_machines)
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


def cmd_data(args: argparse.Namespace) -> None:
    from gen_dist import data

    out = Path(args.out)
    if args.source == "fashion-mnist":
        src = Path(args.path) if args.path else FASHION_MNIST
        if not src.is_dir():
            _fail(f"{src} not found: install Debian's dataset-fashion-mnist or pass the IDX directory")
        done = data.pack_idx_dir(src, out, args.shard_size)
    elif args.source == "idx":
        done = data.pack_idx_dir(Path(args.path), out, args.shard_size)
    elif args.source == "folder":
        done = {args.split: data.pack_image_folder(Path(args.path), out, args.split, args.shard_size,
                                                   args.channels)}
    elif args.source == "latents":
        from gen_dist.tasks.diffusion import encode_split

        if not args.path or not args.data:
            _fail("gen-dist data latents FIRST_STAGE --data IMAGE_DATASET --out DIR")
        done = {args.split: encode_split(Path(args.path), Path(args.data), args.split, out)}
    else:
        done = data.pack_digits(out, args.shard_size)
    for split, entry in done.items():
        print(f"{split}: {entry['count']} samples in {len(entry['shards'])} shards -> {out}")


def _count(text: str) -> int:
    """argparse type of a count: an integer >= 1."""
    return _at_least(text, 1)


def _natural(text: str) -> int:
    """argparse type of an integer >= 0 (0 where it means 'default' or 'none')."""
    return _at_least(text, 0)


def _at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _sampler_overrides(args: argparse.Namespace) -> list[str]:
    """--guidance, --sampler and --steps as diffusion.* overrides."""
    named = {"guidance": "diffusion.guidance", "sampler": "diffusion.sampler", "steps": "diffusion.sample_steps"}
    return [f"{key}={getattr(args, opt)}" for opt, key in named.items() if getattr(args, opt) is not None]


def _add_sampler_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guidance", type=_finite, help="diffusion: classifier-free guidance scale (1 = none)")
    p.add_argument("--sampler", help="diffusion: dpm++, dpm++_sde, ddim, euler, euler_a or heun (objective=ddpm); "
                                     "euler or heun (flow, edm)")
    p.add_argument("--steps", type=_count, help="diffusion: sampler steps")


def _stds(text: str) -> list[float]:
    return [_finite(v) for v in text.split(",") if v.strip()]


def cmd_ema(args: argparse.Namespace) -> None:
    from gen_dist import posthoc

    out, info = posthoc.export(Path(args.run_dir), args.std, Path(args.out) if args.out else None, args.step)
    print(f"ema std {info['sigma_rel']} at step {info['step']} from {info['snapshots']} snapshots (profile error "
          f"{info['profile_error']:.2%}) -> {out}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from gen_dist import sweep

    if args.sweep == "status":
        if not args.sweep_dir:
            _fail("gen-dist sweep status SWEEP_DIR [--plot out.png]")
        print(sweep.format_status(Path(args.sweep_dir)))
        if args.plot:
            print(f"wrote {sweep.plot(Path(args.sweep_dir), Path(args.plot))}")
        return
    if args.sweep == "worker":
        _sweep_worker(args)
        return
    if args.sweep_dir or args.plot:
        _fail("gen-dist sweep SWEEP.yaml [--workers K] [--nproc N] runs a sweep; `gen-dist sweep status DIR` shows one")
    import torch

    from gen_dist.launch import cpu_threads

    s = sweep.load_sweep(Path(args.sweep))
    # On CPUs the trials share the cores: each process gets its part instead of all of them.
    cpu = args.cpu or not torch.cuda.is_available()
    threads = cpu_threads(args.workers * args.nproc) if cpu else 0
    sweep.run_local(s, args.workers, sweep.Launch(nproc=args.nproc, cpu=args.cpu, threads=threads))
    print(sweep.format_status(s.dir))


def _sweep_worker(args: argparse.Namespace) -> None:
    """`gen-dist sweep worker SWEEP_DIR`: one task of the job array `gen-dist slurm sweep` submits. It runs the
    sweep kept in SWEEP_DIR, each trial on all the nodes of its allocation, and exits with REQUEUE_EXIT after
    stopping a trial at a checkpoint, so that the job script requeues it."""
    import os

    from gen_dist import sweep

    if not args.sweep_dir:
        _fail("gen-dist sweep worker SWEEP_DIR [--nproc N] [--cpu] (run by slurm/sweep.sbatch)")
    if not os.environ.get("SLURM_JOB_ID"):
        _fail("gen-dist sweep worker runs inside a SLURM job (gen-dist slurm sweep); on one machine use "
              "gen-dist sweep SWEEP.yaml --workers K")
    sweep_dir = Path(args.sweep_dir)
    s = sweep.load_sweep(sweep_dir / sweep.SWEEP_FILE)
    s.dir = sweep_dir
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or 0)
    threads = max(1, cpus // args.nproc) if args.cpu and cpus else 0
    if sweep.run_local(s, 1, sweep.Launch(nproc=args.nproc, cpu=args.cpu, threads=threads, slurm=True)):
        sys.exit(sweep.REQUEUE_EXIT)
    print(sweep.format_status(s.dir))


def cmd_slurm_sweep(args: argparse.Namespace) -> None:
    from gen_dist.slurm import render_sweep, submit
    from gen_dist.sweep import prepare

    script, s = render_sweep(args.sweep, args.array, _job_spec(args))
    if args.dry_run:
        print(script, end="")
        return
    prepare(s)
    (s.dir / "slurm").mkdir(exist_ok=True)  # sbatch writes the tasks' logs there and does not make it
    print(submit(script, s.dir.resolve(), "slurm/sweep.sbatch"))
    print(f"sweep folder {s.dir}; gen-dist sweep status {s.dir}")


def cmd_sample(args: argparse.Namespace) -> None:
    from gen_dist.sampling import sample_checkpoint

    overrides = [*_sampler_overrides(args), *args.overrides]
    out = sample_checkpoint(Path(args.checkpoint), args.n, Path(args.out), seed=args.seed, use_ema=not args.raw,
                            overrides=overrides, only_class=args.class_)
    print(f"wrote {out}")


def cmd_export(args: argparse.Namespace) -> None:
    from gen_dist.sampling import export

    print(f"wrote {export(Path(args.checkpoint), Path(args.out))}")


def _eval_overrides(args: argparse.Namespace) -> list[str]:
    named = {"metrics": "eval.metrics", "extractors": "eval.extractors", "n": "eval.n", "split":
             "eval.reference_split", "reference_n": "eval.reference_n", "seed": "eval.seed",
             "batch_size": "eval.batch_size"}
    out = []
    for opt, key in named.items():
        value = getattr(args, opt)
        if value is not None:
            out.append(f"{key}=[{value}]" if opt in ("metrics", "extractors") else f"{key}={value}")
    return [*out, *_sampler_overrides(args), *args.overrides]


def cmd_eval(args: argparse.Namespace) -> None:
    from gen_dist import dist
    from gen_dist.evaluation import evaluate_checkpoint, evaluate_snapshots
    from gen_dist.launch import LaunchSpec, run

    overrides = _eval_overrides(args)
    path = Path(args.checkpoint)
    if args.ema_stds and (args.snapshots or args.raw):
        _fail("--ema-stds scores post-hoc EMAs of a run directory; it does not go with --snapshots or --raw")
    if args.nproc > 1:
        from gen_dist.evaluation import check_eval_target

        check_eval_target(path, overrides, args.snapshots or bool(args.ema_stds), not args.raw)  # fail before launch
        flags = [f"--{f}" for f in ("raw", "cpu", "snapshots") if getattr(args, f)]
        if args.ema_stds:
            from gen_dist import posthoc

            for std in args.ema_stds:
                posthoc.plan(path, std)
            flags += ["--ema-stds", ",".join(map(str, args.ema_stds))]
        sys.exit(run(LaunchSpec(nproc=args.nproc, cpu=args.cpu, port=args.port), [args.checkpoint, *overrides,
                                                                                  *flags], command="eval"))
    if args.ema_stds:
        from gen_dist.evaluation import evaluate_posthoc

        rows, best = evaluate_posthoc(path, args.ema_stds, overrides, cpu=args.cpu)
        _print_scores("ema std", [(f"{std:.3f}", scores) for std, scores in rows])
        dist.print0(f"best: ema std {best} (wrote {path / 'eval' / 'posthoc.json'})")
        return
    if args.snapshots:
        curve = evaluate_snapshots(path, overrides, use_ema=not args.raw, cpu=args.cpu)
        _print_scores("step", [(str(step), scores) for step, scores in curve])
        dist.print0(f"wrote {path / 'eval' / 'snapshots.json'}")
        return
    report, out = evaluate_checkpoint(path, overrides, use_ema=not args.raw, cpu=args.cpu)
    for key, value in report["scores"].items():
        dist.print0(f"{key:<32} {value:.6g}")
    for note in report["skipped"]:
        dist.print0(f"not computed: {note}")
    dist.print0(f"wrote {out}")


def _print_scores(label: str, rows: list[tuple[str, dict[str, float]]]) -> None:
    """One line of scores per evaluated model (a snapshot's step, a post-hoc EMA length), on the main rank."""
    from gen_dist import dist

    keys = [k for k in rows[0][1] if k != "eval/seconds"]
    dist.print0(f"{label:<9} " + "  ".join(f"{k.removeprefix('eval/'):>18}" for k in keys))
    for name, scores in rows:
        dist.print0(f"{name:<9} " + "  ".join(f"{scores.get(k, float('nan')):>18.6g}" for k in keys))


def _job_spec(args: argparse.Namespace) -> object:
    from gen_dist.slurm import JobSpec

    return JobSpec(nodes=getattr(args, "nodes", 1), gpus_per_node=args.gpus_per_node,
                   nproc_per_node=args.nproc_per_node, cpus_per_task=args.cpus_per_task, partition=args.partition,
                   account=args.account, qos=args.qos, time=args.time, constraint=args.constraint, mem=args.mem,
                   job_name=args.job_name, signal_seconds=getattr(args, "signal_seconds", 120), setup=args.setup,
                   python=args.python, sbatch_args=args.sbatch_arg)


def cmd_slurm_submit(args: argparse.Namespace) -> None:
    from gen_dist.slurm import render, submit

    script, run_dir = render(args.config, args.overrides, _job_spec(args))
    if args.dry_run:
        print(script, end="")
        return
    print(submit(script, run_dir))


def cmd_slurm_submit_eval(args: argparse.Namespace) -> None:
    from gen_dist.slurm import render_eval, submit

    flags = [f"--{f}" for f in ("raw", "snapshots") if getattr(args, f)]
    script, run_dir = render_eval(args.target, [*_eval_overrides(args), *flags], _job_spec(args))
    if args.dry_run:
        print(script, end="")
        return
    print(submit(script, run_dir, "eval/job.sbatch"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gen-dist", description="Distributed training of generative image models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a config in the current process group", description=TRAIN_HELP,
                       formatter_class=_FamiliesHelp)
    t.add_argument("config", help="YAML config (configs/*.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    t.set_defaults(func=cmd_train)

    la = sub.add_parser("launch", help="start training on N local processes", description=LAUNCH_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    la.add_argument("config")
    la.add_argument("overrides", nargs="*")
    la.add_argument("--nproc", type=_natural, default=0,
                    help="processes on this machine (default: from --accelerate-config, else 1)")
    la.add_argument("--num-machines", type=_count, default=1)
    la.add_argument("--machine-rank", type=_natural, default=0)
    la.add_argument("--main-ip", default="127.0.0.1", help="address of machine rank 0")
    la.add_argument("--port", type=_natural, default=0, help="rendezvous port (default 29500)")
    la.add_argument("--cpu", action="store_true", help="use CPU processes (gloo) even with GPUs present")
    la.add_argument("--accelerate-config", help="accelerate config file, e.g. launcher/accelerate/fsdp.yaml")
    la.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    la.set_defaults(func=cmd_launch)

    d = sub.add_parser("data", help="pack a dataset into WebDataset shards", description=DATA_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("source", choices=["idx", "folder", "digits", "fashion-mnist", "latents"])
    d.add_argument("path", nargs="?", help="source directory (idx, folder; optional for fashion-mnist), or the "
                                           "first stage (latents)")
    d.add_argument("--data", help="latents: the packed image dataset to encode")
    d.add_argument("--out", required=True, help="output directory for shards and index.json")
    d.add_argument("--shard-size", type=_count, default=10000, help="samples per shard (default 10000)")
    d.add_argument("--split", default="train", help="split name for 'folder' and 'latents' (default train)")
    d.add_argument("--channels", type=int, default=3, choices=[1, 3], help="channels for 'folder' (default 3)")
    d.set_defaults(func=cmd_data)

    s = sub.add_parser("sample", help="generate images from a checkpoint",
                       description="Generate --n images from a checkpoint directory (or a run directory: its "
                                   "latest checkpoint, or a file written by `gen-dist export`)."
                                   " --out x.png writes a grid, "
                                   "--out x.npz a uint8 array "
                                   "(N,H,W,C) under the key 'images'. A conditional model's grid has one "
                                   "class per column; --class K makes every image class K.")
    s.add_argument("checkpoint")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides of the sampling (diffusion.*)")
    s.add_argument("--n", type=_count, default=64)
    s.add_argument("--class", dest="class_", type=_natural, help="conditional models: only this class")
    _add_sampler_options(s)
    s.add_argument("--out", default="samples.png")
    s.add_argument("--seed", type=_natural, default=0)
    s.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    s.set_defaults(func=cmd_sample)

    em = sub.add_parser("ema", help="reconstruct a post-hoc EMA of any length from a run's snapshots",
                        description="Reconstruct the power-function EMA with relative std --std (EDM2's "
                                    "sigma_rel, e.g. 0.05 to 0.2) at --step (default: the newest snapshot) as the "
                                    "least-squares combination of the run's post-hoc EMA snapshots "
                                    "(train.posthoc_ema, train.posthoc_every), written as an export that "
                                    "`gen-dist sample` and `gen-dist eval` read.")
    em.add_argument("run_dir")
    em.add_argument("--std", type=_finite, required=True, help="relative std of the EMA")
    em.add_argument("--step", type=_natural, default=0, help="the step to reconstruct at (default: newest)")
    em.add_argument("--out", help="output .safetensors (default RUN/posthoc/ema_<std>_step_<N>.safetensors)")
    em.set_defaults(func=cmd_ema)

    e = sub.add_parser("export", help="write one consolidated safetensors file of a checkpoint",
                       description="Write the generator/denoiser of a checkpoint (or a run directory's latest) "
                                   "as one safetensors file: raw weights under model.*, EMA under ema.*, the run "
                                   "config in its metadata. Works for DDP, ZeRO and FSDP checkpoints alike; "
                                   "`gen-dist sample FILE` reads it.")
    e.add_argument("checkpoint")
    e.add_argument("--out", required=True, help="output .safetensors file")
    e.set_defaults(func=cmd_export)

    ev = sub.add_parser("eval", help="FID, KID, IS, precision/recall of a checkpoint's samples",
                        description=EVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("checkpoint")
    _add_eval_options(ev)
    ev.add_argument("--ema-stds", type=_stds, help="comma-separated relative stds: reconstruct the post-hoc EMA "
                                                   "of each from the run's snapshots (train.posthoc_ema), score "
                                                   "each, report the best (RUN/eval/posthoc.json)")
    ev.add_argument("--nproc", type=_count, default=1, help="local processes (accelerate launch)")
    ev.add_argument("--port", type=_natural, default=0, help="rendezvous port with --nproc (default 29500)")
    ev.add_argument("--cpu", action="store_true", help="run on CPU (gloo) even with GPUs present")
    ev.set_defaults(func=cmd_eval)

    sl = sub.add_parser("slurm", help="submit training jobs to SLURM")
    sl_sub = sl.add_subparsers(dest="slurm_command", required=True)
    su = sl_sub.add_parser("submit", help="render slurm/train.sbatch for a config and sbatch it",
                           description=SUBMIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    su.add_argument("config")
    su.add_argument("overrides", nargs="*")
    su.add_argument("--nodes", type=_count, default=1)
    su.add_argument("--signal-seconds", type=_natural, default=120,
                    help="SIGUSR1 this long before the time limit: checkpoint, then requeue (default 120)")
    _add_job_options(su)
    su.set_defaults(func=cmd_slurm_submit)

    se = sl_sub.add_parser("submit-eval", help="run `gen-dist eval` as its own SLURM job",
                           description=SUBMIT_EVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    se.add_argument("target", help="a run directory (its latest checkpoint, or its snapshots with --snapshots), "
                                   "a checkpoint or an export")
    _add_eval_options(se)
    _add_job_options(se)
    se.set_defaults(func=cmd_slurm_submit_eval)

    ss = sl_sub.add_parser("sweep", help="run a sweep as a job array of sweep workers",
                           description=SLURM_SWEEP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ss.add_argument("sweep", help="the sweep file (docs/sweeps.md)")
    ss.add_argument("--array", type=_count, required=True, help="array tasks: sweep workers running at a time")
    ss.add_argument("--nodes", type=_count, default=1, help="nodes of each task, which each of its trials spans")
    ss.add_argument("--signal-seconds", type=_natural, default=120,
                    help="SIGUSR1 this long before the time limit: the trial checkpoints, the task requeues")
    _add_job_options(ss)
    ss.set_defaults(func=cmd_slurm_sweep)

    sw = sub.add_parser("sweep", help="hyperparameter search over config keys (Optuna), resumable",
                        description=SWEEP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sw.add_argument("sweep", help="a sweep file to run, 'status', or 'worker' (a task of gen-dist slurm sweep)")
    sw.add_argument("sweep_dir", nargs="?", help="status, worker: the sweep folder")
    sw.add_argument("--workers", type=_count, default=1, help="trials run at a time (default 1)")
    sw.add_argument("--nproc", type=_count, default=1, help="processes of each trial (default 1)")
    sw.add_argument("--cpu", action="store_true", help="CPU processes (gloo) even with GPUs present")
    sw.add_argument("--plot", help="status: also draw the objective and each parameter against it (PNG)")
    sw.set_defaults(func=cmd_sweep)

    from gen_dist import monitor

    monitor.add_parsers(sub)
    return p


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides (eval.*, data.path)")
    p.add_argument("--metrics", help="comma-separated: fid,kid,is,pr (default: the run's eval.metrics)")
    p.add_argument("--extractors", help="comma-separated: inception and/or a classifier run directory")
    p.add_argument("--n", type=_count, help="generated samples (default: the run's eval.n)")
    p.add_argument("--split", help="reference split of the dataset (default: the run's, test)")
    p.add_argument("--reference-n", type=_natural, help="real images for the reference (default: the whole split)")
    p.add_argument("--seed", type=_natural)
    p.add_argument("--batch-size", type=_count, help="images generated and embedded at once per process")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    _add_sampler_options(p)
    p.add_argument("--snapshots", action="store_true",
                   help="score every snapshot of the run directory (train.snapshot_every); the curve goes to "
                        "RUN/eval/snapshots.json and to the run's logs as snapshots/*")


def _add_job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus-per-node", type=_natural, default=0, help="0 = a CPU job (gloo)")
    p.add_argument("--nproc-per-node", type=_natural, default=0,
                   help="processes per node (default: one per GPU, 1 on CPU)")
    p.add_argument("--cpus-per-task", type=_natural, default=0, help="CPUs for each node's task (all its ranks)")
    for opt in ("partition", "account", "qos", "time", "constraint", "mem", "job-name"):
        p.add_argument(f"--{opt}", default="", help=f"sbatch --{opt}")
    p.add_argument("--setup", default="", help="bash file sourced by the job first (module load, venv, conda)")
    p.add_argument("--python", default=sys.executable, help="interpreter gen_dist is installed in on the nodes")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="further sbatch option, repeatable (e.g. --sbatch-arg=--exclusive)")
    p.add_argument("--dry-run", action="store_true", help="print the job script instead of submitting it")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow options (`launch CFG --nproc 2 train.steps=10`).
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from gen_dist.checkpoint import CheckpointError
    from gen_dist.config import ConfigError
    from gen_dist.data import DataError
    from gen_dist.parallel import NonFiniteError

    if getattr(args, "source", None) in ("idx", "folder") and not args.path:
        _fail(f"'gen-dist data {args.source}' needs a source directory")
    try:
        args.func(args)
    except (ConfigError, DataError, CheckpointError, NonFiniteError) as e:
        _fail(str(e))


if __name__ == "__main__":
    main()
