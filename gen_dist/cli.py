"""`gen-dist` command line: the parser of every command; the commands themselves live in gen_dist.commands."""

from __future__ import annotations

import argparse
import sys

from gen_dist.commands import data, evaluate, models, run, slurm, status, sweeps
from gen_dist.commands.options import (
    add_eval_options,
    add_job_options,
    add_sampler_options,
    count,
    finite,
    natural,
    stds,
)

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
               shards of the same layout, for latent diffusion's data.latents
  index SOURCE count the samples of every shard of SOURCE (a directory, S3 prefix, brace pattern or list of
               local, http(s), s3 or pipe: URLs) with one streaming read each, in parallel, into a wids shard
               index (--out FILE) that data.index names; it records each image's size (data.buckets needs them)
  text-embeddings SOURCE   every caption of SOURCE (--caption-key) encoded by the --encoder(s) into shards of
               the same names and keys at --out, for data.text_embeddings; --nproc processes (GPUs where
               present) share the shards"""

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


class _FamiliesHelp(argparse.RawDescriptionHelpFormatter):
    """Lists the registered families where a description asks for them, when help is shown (reading the
    registry imports torch, which plain parsing does not need)."""

    def add_text(self, text: str | None) -> None:
        if text and "{families}" in text:
            from gen_dist.family import PLUGINS_ENV, families

            rows = [f"  {f.name:<12} {f.help}" for f in families().values()]
            rows.append(f"  (more from the modules named in {PLUGINS_ENV})")
            text = text.replace("{families}", "\n".join(rows))
        super().add_text(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gen-dist", description="Distributed training of generative image models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a config in the current process group", description=TRAIN_HELP,
                       formatter_class=_FamiliesHelp)
    t.add_argument("config", help="YAML config (configs/*.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    t.set_defaults(func=run.cmd_train)

    la = sub.add_parser("launch", help="start training on N local processes", description=LAUNCH_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    la.add_argument("config")
    la.add_argument("overrides", nargs="*")
    la.add_argument("--nproc", type=count,
                    help="processes on this machine (default: from --accelerate-config, else 1)")
    la.add_argument("--num-machines", type=count, default=1)
    la.add_argument("--machine-rank", type=natural, default=0)
    la.add_argument("--main-ip", default="127.0.0.1", help="address of machine rank 0")
    la.add_argument("--port", type=natural, default=0, help="rendezvous port (default 29500)")
    la.add_argument("--cpu", action="store_true", help="use CPU processes (gloo) even with GPUs present")
    la.add_argument("--accelerate-config", help="accelerate config file, e.g. launcher/accelerate/fsdp.yaml")
    la.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    la.set_defaults(func=run.cmd_launch)

    d = sub.add_parser("data", help="pack a dataset into WebDataset shards", description=DATA_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("source", choices=["idx", "folder", "digits", "fashion-mnist", "latents", "index",
                                      "text-embeddings"])
    d.add_argument("path", nargs="?", help="source directory (idx, folder; optional for fashion-mnist), the "
                                           "first stage (latents), or the shards to count (index)")
    d.add_argument("--data", help="latents: the packed image dataset to encode")
    d.add_argument("--out", required=True, help="output directory for shards and index.json (index: the file)")
    d.add_argument("--workers", type=count, default=8, help="index: shards read at once (default 8)")
    d.add_argument("--shard-size", type=count, default=10000, help="samples per shard (default 10000)")
    d.add_argument("--resolution", type=int, default=0, help="latents: the image side a pretrained VAE (or a "
                   "pipeline's) encodes at (an autoencoder run's own by default)")
    d.add_argument("--classes", type=lambda v: [int(c) for c in v.split(",")], default=None,
                   help="idx, fashion-mnist: only these classes (comma-separated labels, kept as they are)")
    d.add_argument("--split", default="train", help="split name for 'folder' and 'latents' (default train)")
    d.add_argument("--channels", type=int, default=3, choices=[1, 3], help="channels for 'folder' (default 3)")
    d.add_argument("--encoder", action="append", default=[],
                   help="text-embeddings: a text encoder (a directory or hub id; repeatable, in "
                        "diffusion.text_encoder's order)")
    d.add_argument("--max-length", type=count, action="append", default=[],
                   help="text-embeddings: tokens per caption (one for all encoders or one each; default 77)")
    d.add_argument("--caption-key", default="txt", help="text-embeddings: the caption member (default txt)")
    d.add_argument("--index", default="", help="text-embeddings: a wids index of SOURCE's shard counts")
    d.add_argument("--nproc", type=count, default=1, help="text-embeddings: processes sharing the shards")
    d.add_argument("--prompt", action="append", default=[],
                   help="text-embeddings: a prompt of the training grids (train.sample_prompts) to encode too "
                        "(repeatable), so that training never loads the encoders")
    d.set_defaults(func=data.cmd_data)

    s = sub.add_parser("sample", help="generate images from a checkpoint",
                       description="Generate --n images from a checkpoint directory (or a run directory: its "
                                   "latest checkpoint, or a file written by `gen-dist export`)."
                                   " --out x.png writes a grid, "
                                   "--out x.npz a uint8 array "
                                   "(N,H,W,C) under the key 'images'. A conditional model's grid has one "
                                   "class per column; --class K makes every image class K. A text model's grid "
                                   "has one prompt per column (--prompt, repeatable, or --prompts FILE, one per "
                                   "line); without them, one class prompt per column.")
    s.add_argument("checkpoint")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides of the sampling (diffusion.*)")
    s.add_argument("--n", type=count, default=64)
    s.add_argument("--class", dest="class_", type=natural, help="conditional models: only this class")
    s.add_argument("--prompt", action="append", default=[], help="text models: a prompt (repeatable)")
    s.add_argument("--prompts", help="text models: a file of prompts, one per line")
    add_sampler_options(s)
    s.add_argument("--out", default="samples.png")
    s.add_argument("--seed", type=natural, default=0)
    s.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    s.set_defaults(func=models.cmd_sample)

    em = sub.add_parser("ema", help="reconstruct a post-hoc EMA of any length from a run's snapshots",
                        description="Reconstruct the power-function EMA with relative std --std (EDM2's "
                                    "sigma_rel, e.g. 0.05 to 0.2) at --step (default: the newest snapshot) as the "
                                    "least-squares combination of the run's post-hoc EMA snapshots "
                                    "(train.posthoc_ema, train.posthoc_every), written as an export that "
                                    "`gen-dist sample` and `gen-dist eval` read.")
    em.add_argument("run_dir")
    em.add_argument("--std", type=finite, required=True, help="relative std of the EMA")
    em.add_argument("--step", type=natural, default=0, help="the step to reconstruct at (default: newest)")
    em.add_argument("--out", help="output .safetensors (default RUN/posthoc/ema_<std>_step_<N>.safetensors)")
    em.set_defaults(func=models.cmd_ema)

    e = sub.add_parser("export", help="write one consolidated safetensors file of a checkpoint",
                       description="Write the generator/denoiser of a checkpoint (or a run directory's latest) "
                                   "as one safetensors file: raw weights under model.*, EMA under ema.*, the run "
                                   "config in its metadata. Works for DDP, ZeRO and FSDP checkpoints alike; "
                                   "`gen-dist sample FILE` reads it.")
    e.add_argument("checkpoint")
    e.add_argument("--out", required=True, help="output .safetensors file (a directory for diffusers and lora)")
    e.add_argument("--format", default="gen-dist", help="gen-dist (default: one file `gen-dist sample` reads); of a "
                   "fine-tuned pipeline: diffusers (a pipeline directory), lora (for load_lora_weights), kohya "
                   "(A1111/ComfyUI LoRA of SD 1.x/2.x/SDXL), comfyui (SD3/Flux LoRA), single-file (SD 1.x/SDXL "
                   "checkpoint): docs/finetune.md")
    e.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA (formats other than "
                   "gen-dist)")
    e.set_defaults(func=models.cmd_export)

    pi = sub.add_parser("pipeline", help="assemble a Stable-Diffusion-shaped diffusers pipeline to train",
                        description="`gen-dist pipeline new SPEC --out DIR`: a StableDiffusionPipeline with a fresh "
                                    "UNet, a KL autoencoder run as its VAE and a transformers text encoder, as the "
                                    "YAML SPEC describes (configs/pipelines/fashion_mnist.yaml); train it with "
                                    "diffusion.pretrained=DIR.")
    pi.add_argument("action", choices=["new"])
    pi.add_argument("spec")
    pi.add_argument("--out", required=True, help="the pipeline directory to write")
    pi.set_defaults(func=models.cmd_pipeline)

    ev = sub.add_parser("eval", help="FID, KID, IS, precision/recall of a checkpoint's samples",
                        description=EVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("checkpoint")
    add_eval_options(ev)
    ev.add_argument("--ema-stds", type=stds, help="comma-separated relative stds: reconstruct the post-hoc EMA "
                                                   "of each from the run's snapshots (train.posthoc_ema), score "
                                                   "each, report the best (RUN/eval/posthoc.json)")
    ev.add_argument("--nproc", type=count, default=1, help="local processes (accelerate launch)")
    ev.add_argument("--port", type=natural, default=0, help="rendezvous port with --nproc (default 29500)")
    ev.add_argument("--cpu", action="store_true", help="run on CPU (gloo) even with GPUs present")
    ev.set_defaults(func=evaluate.cmd_eval)

    sl = sub.add_parser("slurm", help="submit training jobs to SLURM")
    sl_sub = sl.add_subparsers(dest="slurm_command", required=True)
    su = sl_sub.add_parser("submit", help="render slurm/train.sbatch for a config and sbatch it",
                           description=SUBMIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    su.add_argument("config")
    su.add_argument("overrides", nargs="*")
    su.add_argument("--nodes", type=count, default=1)
    su.add_argument("--signal-seconds", type=natural, default=120,
                    help="SIGUSR1 this long before the time limit: checkpoint, then requeue (default 120)")
    add_job_options(su)
    su.set_defaults(func=slurm.cmd_slurm_submit)

    se = sl_sub.add_parser("submit-eval", help="run `gen-dist eval` as its own SLURM job",
                           description=SUBMIT_EVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    se.add_argument("target", help="a run directory (its latest checkpoint, or its snapshots with --snapshots), "
                                   "a checkpoint or an export")
    add_eval_options(se)
    add_job_options(se)
    se.set_defaults(func=slurm.cmd_slurm_submit_eval)

    ss = sl_sub.add_parser("sweep", help="run a sweep as a job array of sweep workers",
                           description=SLURM_SWEEP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ss.add_argument("sweep", help="the sweep file (docs/sweeps.md)")
    ss.add_argument("--array", type=count, required=True, help="array tasks: sweep workers running at a time")
    ss.add_argument("--nodes", type=count, default=1, help="nodes of each task, which each of its trials spans")
    ss.add_argument("--signal-seconds", type=natural, default=120,
                    help="SIGUSR1 this long before the time limit: the trial checkpoints, the task requeues")
    add_job_options(ss)
    ss.set_defaults(func=slurm.cmd_slurm_sweep)

    sw = sub.add_parser("sweep", help="hyperparameter search over config keys (Optuna), resumable",
                        description=SWEEP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sw.add_argument("sweep", help="a sweep file to run, 'status', or 'worker' (a task of gen-dist slurm sweep)")
    sw.add_argument("sweep_dir", nargs="?", help="status, worker: the sweep folder")
    sw.add_argument("--workers", type=count, default=1, help="trials run at a time (default 1)")
    sw.add_argument("--nproc", type=count, default=1, help="processes of each trial (default 1)")
    sw.add_argument("--cpu", action="store_true", help="CPU processes (gloo) even with GPUs present")
    sw.add_argument("--plot", help="status: also draw the objective and each parameter against it (PNG)")
    sw.set_defaults(func=sweeps.cmd_sweep)

    status.add_parsers(sub)
    return p


def _error(msg: str) -> None:
    print(f"gen-dist: error: {msg}", file=sys.stderr)
    sys.exit(2)


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
    from gen_dist.data import DataError
    from gen_dist.parallel import NonFiniteError
    from gen_dist.schema import ConfigError

    if getattr(args, "source", None) in ("idx", "folder", "index") and not args.path:
        _error(f"'gen-dist data {args.source}' needs a source directory")
    try:
        args.func(args)
    except (ConfigError, DataError, CheckpointError, NonFiniteError) as e:
        _error(str(e))


if __name__ == "__main__":
    main()
