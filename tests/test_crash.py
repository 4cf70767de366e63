"""kill -9 at random moments (mid-step, mid-checkpoint), resume, repeat: the run ends exactly where an
uninterrupted one does: weights, EMA, optimizer state and the sample keys of every step."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import R3GAN, ROOT, kill_tree, run_cli, smoke_args, train_command
from safetensors.torch import load_file

from gen_dist import checkpoint

STEPS = 14
KILLS = 2
# A checkpoint every step, so that kills land inside checkpoint writes too.
COMMON = [f"train.steps={STEPS}", "train.ckpt_every=1", "train.log_every=1", "train.log_keys=true",
          "train.keep_checkpoints=2", "track.backends=[jsonl]", "data.num_workers=1"]


def _command(task: str, run_dir: Path, digits: Path, nproc: int, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "gen_dist", *train_command(nproc, *smoke_args(task, run_dir, digits), *COMMON,
                                                             *extra)]


def _steps_logged(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for x in lines if x.endswith("}") and '"event"' not in x)


def _kill_during_training(cmd: list[str], run_dir: Path, rng: random.Random) -> bool:
    """Start the run, wait until it trains a new step, SIGKILL all its processes a random moment later.
    Returns False when the run finished before it could be killed."""
    seen = _steps_logged(run_dir)
    log = run_dir.parent / "killed_run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "WANDB_MODE": "disabled"})
    deadline = time.monotonic() + 120
    while _steps_logged(run_dir) <= seen and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.25))
    if proc.poll() is not None:  # it ended by itself: fine only when it finished the run
        assert proc.returncode == 0, log.read_text()[-3000:]
        return False
    kill_tree(proc)
    return True


def _keys(run_dir: Path) -> dict[tuple[int, int], list[str]]:
    """(rank, step) -> keys, the last record of a step winning (a killed run re-does its last steps)."""
    out = {}
    for f in sorted(run_dir.glob("keys_rank*.jsonl")):
        rank = int(f.stem.removeprefix("keys_rank"))
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by the kill
                continue
            out[(rank, rec["step"])] = rec["keys"]
    return out


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = checkpoint.latest(run_dir)
    assert ckpt is not None and ckpt.name == f"step_{STEPS:08d}"
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    for f in sorted(ckpt.glob("optimizer*.bin")):
        state = torch.load(f, weights_only=True)["state"]
        out.update({f"{f.name}:{i}:{k}": v for i, s in state.items() for k, v in s.items()})
    return out


# Every family on 2 ranks and the GAN and VAE on 1; the VQ-VAE (codebook buffers, a discriminator phase from
# step 2); the DiT with flow matching and post-hoc EMA profiles, and the UNet with EDM.
DIT_FLOW = ("diffusion.backbone=dit", "diffusion.objective=flow", "diffusion.dit_depth=2", "diffusion.dit_heads=2",
            "diffusion.dit_head_dim=8", "train.posthoc_ema=[0.05,0.1]", "train.posthoc_every=3")
# (task, ranks, overrides, kills): each killed twice, the kill mechanics being shared. The GAN trains R3GAN's
# recipe, every schedule mid-way throughout (ADA's exact resume: tests/test_gan_quality.py).
CASES = [("vae", 1, (), KILLS),
         *[(t, 2, (), KILLS) for t in ("diffusion", "vae", "vqvae")], ("gan", 2, R3GAN, KILLS),
         ("diffusion", 2, DIT_FLOW, 2), ("diffusion", 2, ("diffusion.objective=edm",), 2)]
IDS = [f"{task}-{n}" + "".join(f"-{x.split('=')[1]}" for x in extra[:1 if task == "gan" else 2])
       for task, n, extra, _ in CASES]


@pytest.mark.parametrize(("task", "nproc", "extra", "kills"), CASES, ids=IDS)
def test_kill9_anywhere_then_resume_equals_uninterrupted(task: str, nproc: int, extra: tuple[str, ...], kills: int,
                                                        tmp_path: Path, digits: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_command(task, straight, digits, nproc, extra), cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "WANDB_MODE": "disabled"})
    rng = random.Random(f"{task}{nproc}{extra}")
    done = sum(_kill_during_training(_command(task, killed, digits, nproc, extra), killed, rng) for _ in range(kills))
    assert done == kills, f"the run finished before it could be killed {kills} times"
    run_cli(*_command(task, killed, digits, nproc, extra)[3:])  # to the end
    a, b = _state(straight), _state(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    keys_a, keys_b = _keys(straight), _keys(killed)
    assert len(keys_a) == STEPS * nproc and keys_a == keys_b
    assert not list((killed / "checkpoints").glob(".tmp_*"))
    if "train.posthoc_ema=[0.05,0.1]" in extra:  # the profiles are in the checkpoint, and their snapshots agree
        assert any(k.startswith("posthoc_1.safetensors:") for k in a)
        for f in sorted((straight / "posthoc").glob("step_*.safetensors")):
            x, y = load_file(str(f)), load_file(str(killed / "posthoc" / f.name))
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f.name
