"""The real training loop, in-process (1 rank) and launched with accelerate (2 gloo ranks)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS, R3GAN, ROOT, events, free_port, run_cli, smoke_args, step_records
from PIL import Image
from safetensors.torch import load_file

from gen_dist.config import load_config
from gen_dist.engine import Trainer

TASKS = ["diffusion", "gan", "vae"]


def make_trainer(task: str, tmp_path: Path, digits: Path, *extra: str) -> Trainer:
    cfg = load_config(CONFIGS / f"smoke_{task}.yaml",
                      [f"run_dir={tmp_path / task}", f"data.path={digits}", "track.backends=[jsonl]", *extra])
    return Trainer(cfg)


@pytest.mark.parametrize("task", ["diffusion", "vae"])
def test_loss_goes_down_on_a_fixed_batch(task: str, tmp_path: Path, digits: Path) -> None:
    trainer = make_trainer(task, tmp_path, digits, "optim.lr=3e-3")
    batch = next(trainer.feed.batches())
    losses = []
    for _ in range(40):
        stats = trainer.train_step([batch])
        losses.append(next(v.item() for k, v in stats.items() if k.endswith("/loss")))
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8]), losses


@pytest.mark.parametrize("task", TASKS)
def test_single_process_run_writes_outputs(task: str, tmp_path: Path, digits: Path) -> None:
    run_dir = tmp_path / task
    run_cli("train", *smoke_args(task, run_dir, digits))
    (start,) = events(run_dir, "start")
    assert start["world_size"] == 1
    logged = step_records(run_dir)
    assert [r["step"] for r in logged] == [2, 4, 6]
    losses = [v for r in logged for k, v in r.items() if k.endswith("loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    assert all(0 <= r["data_wait_frac"] <= 1 and r["images_per_s"] > 0 for r in logged)
    grid = Image.open(run_dir / "samples" / "step_00000006.png")
    assert grid.size[0] > 8 and np.asarray(grid).std() > 0
    assert (run_dir / "checkpoints" / "step_00000006" / "meta.json").exists()
    assert (run_dir / "config.yaml").exists() and "step       6" in (run_dir / "train.log").read_text()
    assert list((run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("task", TASKS)
def test_two_process_run(task: str, tmp_path: Path, digits: Path) -> None:
    run_dir = tmp_path / task
    run_cli("launch", *smoke_args(task, run_dir, digits), "--nproc", "2", "--port", free_port())
    (start,) = events(run_dir, "start")
    assert start["world_size"] == 2 and start["backend"] == "gloo"
    assert start["global_batch"] == 32
    losses = [v for r in step_records(run_dir) for k, v in r.items() if k.endswith("loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1


def test_shipped_cpu_accelerate_config_gives_two_ranks(tmp_path: Path, digits: Path) -> None:
    run_dir = tmp_path / "vae"
    from gen_dist.perf import NATIVE_BF16_CPU_FLAGS, cpu_flags

    run_cli("launch", *smoke_args("vae", run_dir, digits), "train.steps=2", "train.mixed_precision=auto", "--cpu",
            "--accelerate-config", str(ROOT / "launcher" / "accelerate" / "cpu.yaml"), "--port", free_port())
    (start,) = events(run_dir, "start")
    assert start["world_size"] == 2 and start["backend"] == "gloo"
    # auto: bf16 on a CPU with native bf16, fp32 elsewhere; the choice and its reason are in the start event.
    native = bool(set(NATIVE_BF16_CPU_FLAGS) & cpu_flags())
    assert start["mixed_precision"] == ("bf16" if native else "no")
    assert start["precision_choice"]["asked"] == "auto" and "the CPU has" in start["precision_choice"]["why"]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return {**load_file(str(ckpt / "model.safetensors")), **{f"ema.{k}": v for k, v in
                                                              load_file(str(ckpt / "ema.safetensors")).items()}}


# The GAN: the DCGAN nets with minibatch std over fixed groups, rpgan with lazy R1 and R2, and ADA summed over
# ranks; R3GAN's recipe with every schedule moving.
EQUAL_BATCH = {"diffusion": ("diffusion", ()),
               "gan": ("gan", ("gan.loss=rpgan", "gan.r2_gamma=1", "gan.mbstd_group=4")), "gan-r3gan": ("gan", R3GAN)}


@pytest.mark.parametrize("case", list(EQUAL_BATCH))
def test_ddp_matches_one_process_on_the_same_global_batch(case: str, tmp_path: Path, digits: Path) -> None:
    """2 ranks x 1 micro-batch of 8 == 1 rank x 2 accumulated micro-batches of 8 (same samples, same noise)."""
    task, extra = EQUAL_BATCH[case]
    common = ["data.batch_size=8", "train.steps=5", "train.ckpt_every=5", "optim.grad_clip=0", *extra]
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("train", *smoke_args(task, one, digits), *common, "train.grad_accum=2", "data.num_workers=2")
    run_cli("launch", *smoke_args(task, two, digits), *common, "data.num_workers=0", "--nproc", "2",
            "--port", free_port())
    a, b = _final_weights(one), _final_weights(two)
    assert a.keys() == b.keys()
    # Summation order differs between an all-reduce and local accumulation; Adam's early steps divide by a tiny
    # second moment and turn that rounding into differences of ~5e-5 (parameters whose true gradient is ~0,
    # such as attention key biases, most). A wrong split of the data or of the noise moves weights by ~lr=1e-3.
    atol = 2e-4
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=k)
    init = make_trainer(task, tmp_path, digits, *extra).modules[task == "gan" and "D" or "denoiser"].state_dict()
    moved = max((a[k] - v).abs().max().item() for k, v in init.items())
    assert moved > 10 * atol, "training barely changed the weights; the comparison would prove nothing"


def test_resume_continues_with_the_same_state(tmp_path: Path, digits: Path) -> None:
    """6 steps straight == 3 steps, stop, resume for 3 more: the same weights, optimizer state and data."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli("train", *smoke_args("gan", straight, digits), "train.ckpt_every=100")
    run_cli("train", *smoke_args("gan", resumed, digits), "train.steps=3")
    # Pretend the checkpoint was written under another torch and Python: resuming warns, naming both.
    meta_file = resumed / "checkpoints" / "step_00000003" / "meta.json"
    meta = json.loads(meta_file.read_text())
    assert set(meta["versions"]) == {"python", "torch", "accelerate", "deepspeed", "diffusers", "webdataset"}
    now = dict(meta["versions"])
    meta["versions"].update(torch="1.0.0", python="3.0.0")
    meta_file.write_text(json.dumps(meta))
    proc = run_cli("train", *smoke_args("gan", resumed, digits))
    assert f"torch 1.0.0 -> {now['torch']}" in proc.stderr and f"python 3.0.0 -> {now['python']}" in proc.stderr
    (changed,) = events(resumed, "versions_changed")
    assert len(changed["changes"]) == 2
    (start,) = [e for e in events(resumed, "start") if e["resumed"]]
    assert start["step"] == 3
    assert [r["step"] for r in step_records(resumed)] == [2, 3, 4, 6]
    ends = [sorted((d / "checkpoints").glob("step_*"))[-1] for d in (straight, resumed)]
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):
        a, b = (load_file(str(e / name)) for e in ends)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k}"
    for name in ("optimizer.bin", "optimizer_1.bin"):
        a, b = (torch.load(e / name, weights_only=True) for e in ends)
        for i, state in a["state"].items():
            for k, v in state.items():
                assert torch.equal(v, b["state"][i][k]), f"{name}:{i}:{k}"


def test_resume_with_another_model_is_refused(tmp_path: Path, digits: Path) -> None:
    run_dir = tmp_path / "vae"
    run_cli("train", *smoke_args("vae", run_dir, digits), "train.steps=2")
    proc = run_cli("train", *smoke_args("vae", run_dir, digits), "vae.latent_dim=5", check=False)
    assert proc.returncode == 2
    assert "holds checkpoints of another model (vae.latent_dim: 4 -> 5)" in proc.stderr
    run_cli("train", *smoke_args("vae", run_dir, digits), "train.steps=3", "optim.lr=1e-4")


def test_sample_command(tmp_path: Path, digits: Path) -> None:
    run_dir = tmp_path / "vae"
    run_cli("train", *smoke_args("vae", run_dir, digits), "train.steps=2")
    run_cli("sample", str(run_dir), "--n", "12", "--out", str(tmp_path / "g.png"))
    run_cli("sample", str(run_dir), "--n", "12", "--out", str(tmp_path / "g.npz"))
    arr = np.load(tmp_path / "g.npz")["images"]
    assert arr.shape == (12, 8, 8, 1) and arr.dtype == np.uint8
    assert Image.open(tmp_path / "g.png").size == (4 * 10 + 2, 3 * 10 + 2)


def test_launch_command_gives_one_gloo_group() -> None:
    from gen_dist.launch import LaunchSpec, launch_command

    cmd, env = launch_command(LaunchSpec(nproc=2, cpu=True), ["c.yaml"])
    assert env == {"ACCELERATE_USE_CPU": "1"}
    assert "--multi_gpu" in cmd and "--cpu" not in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    cmd, _ = launch_command(LaunchSpec(nproc=2, num_machines=2, machine_rank=1, main_ip="10.0.0.1"), ["c.yaml"])
    assert cmd[cmd.index("--num_processes") + 1] == "4" and cmd[cmd.index("--machine_rank") + 1] == "1"


def test_cpu_ranks_take_the_threads_they_are_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each CPU rank gets the cores divided by the ranks, or OMP_NUM_THREADS where it is set: the share of the
    cores a sweep gives each of its concurrent trials."""
    from gen_dist.launch import LaunchSpec, launch_command

    def threads() -> str:
        cmd, _ = launch_command(LaunchSpec(nproc=2, cpu=True), ["c.yaml"])
        return cmd[cmd.index("--num_cpu_threads_per_process") + 1]

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert threads() == "8"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads() == "3"


@pytest.mark.parametrize("command", ["train", "launch", "data", "sample"])
def test_help(command: str) -> None:
    assert "usage: gen-dist " + command in run_cli(command, "--help").stdout


@pytest.mark.parametrize("task", TASKS)
def test_bf16_steps_are_finite(task: str, tmp_path: Path, digits: Path) -> None:
    trainer = make_trainer(task, tmp_path, digits, "train.mixed_precision=bf16")
    batches = trainer.feed.batches()
    for _ in range(2):
        stats = trainer.train_step([next(batches)])
        assert all(math.isfinite(v.item()) for v in stats.values()), stats


def test_torchrun_launch(tmp_path: Path, digits: Path) -> None:
    """`gen-dist train` joins whatever group launched it; torchrun gives 2 gloo ranks on CPU."""
    import subprocess
    import sys

    run_dir = tmp_path / "vae"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port(),
           "-m", "gen_dist", "train", *smoke_args("vae", run_dir, digits), "train.steps=2", "train.cpu=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (start,) = events(run_dir, "start")
    assert start["world_size"] == 2 and start["backend"] == "gloo"


def test_same_checkpoint_gives_the_same_grid_on_one_and_two_ranks(tmp_path: Path, digits: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The grid written at the end of a 2-rank run (chunks of 8 spread over the ranks) is the grid
    `gen-dist sample` makes from the same checkpoint in one process."""
    run_dir = tmp_path / "vae"
    run_cli("launch", *smoke_args("vae", run_dir, digits), "train.steps=2", "eval.batch_size=8", "--nproc", "2",
            "--port", free_port())
    two = np.asarray(Image.open(run_dir / "samples" / "step_00000002.png"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the threads each launched rank had
    run_cli("sample", str(run_dir), "--n", "20", "--out", str(tmp_path / "one.png"))
    one = np.asarray(Image.open(tmp_path / "one.png"))
    assert one.shape == two.shape and np.array_equal(one, two)
