"""Shared fixtures: tiny packed datasets and a way to run the real CLI in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every in-process test draws the same random numbers whatever ran before it in the same worker."""
    import random

    import torch

    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """In-process Trainers each get their own Accelerator settings (the state is a process-wide singleton)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's digits packed into 5 train shards."""
    from gen_dist.data import pack_digits

    out = tmp_path_factory.mktemp("digits")
    pack_digits(out, shard_size=300)
    return out


def run_cli(*args: str, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run `gen-dist ARGS` in a fresh interpreter, as a user would."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "gen_dist", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"gen-dist {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def free_port() -> str:
    from gen_dist.dist import free_port as port

    return str(port())


def train_command(nproc: int, *args: str) -> list[str]:
    """`gen-dist` arguments that train `args` in this process group of 1 (train) or on nproc local ranks
    (launch, on a free port)."""
    if nproc == 1:
        return ["train", *args]
    return ["launch", *args, "--nproc", str(nproc), "--port", free_port()]


R3GAN = ("gan.arch=r3gan", "gan.channels=[32,16]", "gan.d_channels=[16,32]", "gan.loss=rpgan", "gan.r1_gamma=1",
         "gan.r2_gamma=1", "gan.r1_every=1", "gan.ada_target=0", "optim.betas=[0.0,0.9]",
         "gan.augment=xflip,rotate90,xint,scale,rotate,aniso,color", "gan.schedule.kimg=[0.05,0.8]",
         "gan.schedule.lr=[1e-3,2e-4]", "gan.schedule.beta2=[0.9,0.99]", "gan.schedule.gamma=[1,0.1]",
         "gan.schedule.ema_kimg=[0,0.1]", "gan.schedule.augment_p=[0,0.5]")
"""The smoke GAN with R3GAN's recipe (on the 8x8 digits): its nets, rpgan with R1 and R2 in D's phase, ADA's
geometric ops, every schedule moving over the first 800 images (mid-way through a short test run)."""


def smoke_args(task: str, run_dir: Path, data: Path, *extra: str) -> list[str]:
    return [str(CONFIGS / f"smoke_{task}.yaml"), f"run_dir={run_dir}", f"data.path={data}", *extra]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def events(run_dir: Path, name: str) -> list[dict]:
    return [r for r in records(run_dir) if r.get("event") == name]


def step_records(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if "step" in r and "event" not in r]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it at once, as losing the node would: torch's launcher starts
    each rank in a session of its own, out of reach of the launcher's process group."""
    import contextlib
    import signal

    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="session")
def text_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT-like text encoder and its word-level tokenizer, saved as a model directory."""
    from textenc import make_encoder

    return make_encoder(tmp_path_factory.mktemp("text_encoder") / "bert")


@pytest.fixture(scope="session")
def captioned(tmp_path_factory: pytest.TempPathFactory, digits: Path) -> Path:
    """The digits with a txt caption member per sample."""
    from textenc import caption_shards

    return caption_shards(digits, tmp_path_factory.mktemp("captioned"))
