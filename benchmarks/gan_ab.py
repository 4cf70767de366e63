"""The GAN recipes at equal wall clock on 2 CPU processes (Fashion-MNIST, 28x28):

- dcgan: configs/gan_fashion_mnist.yaml (DCGAN nets, non-saturating loss, lazy R1, ADA);
- dcgan+r3: the same nets with R3GAN's recipe (rpgan, R1 + R2 every step, schedules, beta1 = 0);
- r3gan: configs/gan_r3gan_fashion_mnist.yaml (R3GAN's nets and recipe).

Each trains class-conditionally on Fashion-MNIST (scored by Inception and domain FID against the test split) and
unconditionally on Stacked Fashion-MNIST (three channels, each an independent image: 1,000 class triples), where
the domain classifier labels each channel of 10,000 samples and the modes are the triples seen. Every run is
stopped by SIGUSR1 (gen_dist's preemption: a checkpoint at the next step) after the same number of seconds.

    python benchmarks/gan_ab.py --seconds 240 --classifier runs/finetune_demo/classifier [--out runs/gan_ab]
    python benchmarks/gan_ab.py --step-times --classifier runs/finetune_demo/classifier   (ms per step per option)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gen_dist.artifact import load_model  # noqa: E402
from gen_dist.data.pack import pack_arrays, read_idx  # noqa: E402
from gen_dist.sampling import sample_chunk  # noqa: E402
from gen_dist.tasks.classifier import DomainClassifier  # noqa: E402

R3 = ["gan.loss=rpgan", "gan.r1_gamma=0.1", "gan.r2_gamma=0.1", "gan.r1_every=1", "gan.ada_target=0",
      "optim.betas=[0.0,0.9]", "gan.augment=xint,scale,rotate,aniso", "gan.schedule.kimg=[0,192]",
      "gan.schedule.lr=[5e-4,1e-4]", "gan.schedule.beta2=[0.9,0.99]", "gan.schedule.gamma=[0.1,0.01]",
      "gan.schedule.ema_kimg=[0,10]", "gan.schedule.augment_p=[0,0.2]"]
RECIPES = {"dcgan": ("gan_fashion_mnist", []), "dcgan+r3": ("gan_fashion_mnist", R3),
           "r3gan": ("gan_r3gan_fashion_mnist", [])}
GD = [sys.executable, "-m", "gen_dist"]
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def stacked(raw: Path, out: Path, n: int = 60000) -> Path:
    """Stacked Fashion-MNIST: each image's three channels are three independent training images."""
    if (out / "index.json").exists():
        return out
    images = read_idx(raw / "train-images-idx3-ubyte.gz")
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(images), size=(n, 3))
    for split, rows in (("train", picks), ("test", picks[:2000])):
        pack_arrays(np.stack([images[r] for r in rows.T], axis=-1), np.zeros(len(rows), dtype=np.int64), out, split,
                    10000, ["stack"])
    return out


def launch_command(config: str, run: Path, data: Path, steps: int, *extra: str) -> list[str]:
    """2 CPU processes of one config, without sampling, progress bar or checkpoints before the last step."""
    return [*GD, "launch", str(ROOT / "configs" / f"{config}.yaml"), "--nproc", "2", "--cpu", f"run_dir={run}",
            f"data.path={data}", f"train.steps={steps}", "train.sample_every=0", f"train.ckpt_every={steps}",
            "train.progress=false", *extra]


def train(name: str, run: Path, data: Path, seconds: float, extra: list[str]) -> dict:
    config, overrides = RECIPES[name]
    if (run / "done.json").exists():
        return json.loads((run / "done.json").read_text())
    proc = subprocess.Popen(launch_command(config, run, data, 100000, *overrides, *extra), cwd=ROOT, env=ENV,
                            start_new_session=True, stdout=subprocess.DEVNULL)
    time.sleep(seconds)
    # The ranks (the launcher ignores the signal and accelerate starts them in sessions of their own): each
    # checkpoints after the step it is in, and stops.
    subprocess.run(["pkill", "-USR1", "-f", f"gen_dist train .*run_dir={re.escape(str(run))} "], check=True)
    proc.wait()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "images_per_s" in r]
    done = {"steps": steps[-1]["step"] if steps else 0, "images_per_s": float(np.mean([r["images_per_s"]
                                                                                        for r in steps[1:]]))}
    (run / "done.json").write_text(json.dumps(done))
    return done


def fids(run: Path, classifier: Path) -> dict[str, float]:
    proc = subprocess.run([*GD, "eval", str(run), "--nproc", "2", "--cpu", "--n", "2000", "--reference-n", "2000",
                           "--metrics", "fid", "--extractors", f"inception,{classifier}"], cwd=ROOT, check=True,
                          capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    out = Path(proc.stdout.strip().splitlines()[-1].removeprefix("wrote "))
    scores = json.loads(out.read_text())["scores"]
    return {k.removeprefix("eval/"): round(v, 2) for k, v in scores.items() if "fid" in k}


@torch.no_grad()
def modes(run: Path, classifier: DomainClassifier, n: int = 10000) -> dict[str, float]:
    _, task, net = load_model(run, use_ema=True, device=torch.device("cpu"))
    images = torch.cat([sample_chunk(task, net, 0, start, 500, torch.device("cpu"), torch.no_grad)
                        for start in range(0, n, 500)])
    classes = [classifier(images[:, c:c + 1])[1].argmax(1) for c in range(3)]
    triples = (classes[0] * 100 + classes[1] * 10 + classes[2]).numpy()
    counts = np.bincount(triples, minlength=1000) / n
    kl = float(np.sum(counts[counts > 0] * np.log(counts[counts > 0] * 1000)))
    return {"modes": int((counts > 0).sum()), "kl_to_uniform": round(kl, 3)}


OPTIONS = {  # each adds one option to the one before it, on the DCGAN Fashion-MNIST config
    "today (ns, R1 every 16, ADA)": [],
    "+ rpgan": ["gan.loss=rpgan"],
    "+ R2 lazy": ["gan.loss=rpgan", "gan.r2_gamma=0.1"],
    "+ R1/R2 every step": ["gan.loss=rpgan", "gan.r2_gamma=0.1", "gan.r1_every=1"],
    "+ geometric augmentation": ["gan.loss=rpgan", "gan.r2_gamma=0.1", "gan.r1_every=1",
                                 "gan.augment=xint,scale,rotate,aniso"],
    "+ schedules (the recipe)": R3,
}


def step_times(out: Path, data: Path, steps: int = 40) -> None:
    """ms per step of each option, 2 processes, batch 64 per rank (the last half of the steps)."""
    rows = {**{k: ("gan_fashion_mnist", v) for k, v in OPTIONS.items()}, "r3gan nets": ("gan_r3gan_fashion_mnist", [])}
    for name, (config, extra) in rows.items():
        run = out / "step_times" / re.sub(r"\W+", "_", name).strip("_")
        subprocess.run(launch_command(config, run, data, steps, "train.log_every=5", *extra), cwd=ROOT, env=ENV,
                       check=True, capture_output=True)
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        rates = [r["images_per_s"] for r in recs if "images_per_s" in r and r["step"] > steps // 2]
        print(f"{name:<32} {1000 * 128 / float(np.mean(rates)):8.1f} ms/step  {np.mean(rates):7.1f} images/s",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=240)
    p.add_argument("--classifier", type=Path, required=True)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "gan_ab")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "fashion_mnist")
    p.add_argument("--raw", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                   help="Fashion-MNIST's IDX files, for the stacked set")
    p.add_argument("--step-times", action="store_true", help="only the step time of each option")
    args = p.parse_args()
    if args.step_times:
        step_times(args.out, args.data)
        return
    stack = stacked(args.raw, args.out / "fashion_stacked")
    classifier = DomainClassifier(args.classifier, torch.device("cpu"))
    rows = {}
    for name in RECIPES:
        fashion = train(name, args.out / name / "fashion", args.data, args.seconds, [])
        stack_run = train(name, args.out / name / "stacked", stack, args.seconds,
                          ["data.channels=3", "gan.num_classes=0", "data.hflip=false"])
        rows[name] = {"fashion": {**fashion, **fids(args.out / name / "fashion", args.classifier)},
                      "stacked": {**stack_run, **modes(args.out / name / "stacked", classifier)}}
        print(name, json.dumps(rows[name]), flush=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
