"""Checkpoints that are broken or unsafe are skipped in favour of the previous one; a failed save loses nothing."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import events, run_cli, smoke_args
from safetensors.torch import load_file

from gen_dist import checkpoint


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = checkpoint.latest(run_dir)
    return {**load_file(str(ckpt / "model.safetensors")), **load_file(str(ckpt / "model_1.safetensors"))}


def _train(run_dir: Path, digits: Path, *extra: str):
    return run_cli("train", *smoke_args("gan", run_dir, digits), "train.ckpt_every=3", "wandb.enabled=false", *extra)


class Exploit:
    """Unpickling this would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _rewrite_manifest(ckpt: Path) -> None:
    """Make the checksums match the tampered files, as an attacker (not a crash) would."""
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"] = checkpoint.manifest(ckpt)
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path: Path, digits: Path) -> None:
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    _train(straight, digits, "train.steps=8")
    _train(broken, digits, "train.steps=6")
    weights = broken / "checkpoints" / "step_00000006" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0xFF  # one flipped byte inside a tensor
    weights.write_bytes(bytes(raw))
    proc = _train(broken, digits, "train.steps=8")
    assert "skipping checkpoint step_00000006" in proc.stderr and "checksum mismatch" in proc.stderr
    assert [e["step"] for e in events(broken, "resume")] == [3]
    a, b = _final(straight), _final(broken)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_truncated_checkpoint_is_skipped(tmp_path: Path, digits: Path) -> None:
    run_dir = tmp_path / "run"
    _train(run_dir, digits, "train.steps=6")
    opt = run_dir / "checkpoints" / "step_00000006" / "optimizer.bin"
    opt.write_bytes(opt.read_bytes()[:100])
    proc = _train(run_dir, digits, "train.steps=7")
    assert "optimizer.bin has 100 bytes" in proc.stderr
    assert [e["step"] for e in events(run_dir, "resume")] == [3]


def test_checkpoint_with_code_in_a_pickle_is_refused(tmp_path: Path, digits: Path) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    _train(run_dir, digits, "train.steps=6")
    ckpt = run_dir / "checkpoints" / "step_00000006"
    state = torch.load(ckpt / "optimizer.bin", weights_only=True)
    state["param_groups"][0]["payload"] = Exploit(marker)
    torch.save(state, ckpt / "optimizer.bin", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    _rewrite_manifest(ckpt)
    proc = _train(run_dir, digits, "train.steps=7")
    assert "is not plain tensor data" in proc.stderr and "refusing to load it" in proc.stderr
    assert [e["step"] for e in events(run_dir, "resume")] == [3]
    assert not marker.exists()


def test_checkpoint_holds_no_pickled_rng_state(tmp_path: Path, digits: Path) -> None:
    run_dir = tmp_path / "run"
    _train(run_dir, digits, "train.steps=3")
    ckpt = run_dir / "checkpoints" / "step_00000003"
    assert not list(ckpt.glob("random_states_*"))
    checkpoint.check_safe(ckpt)  # every pickle in it loads with weights_only=True


def test_nonfinite_loss_skips_the_step_on_every_phase(tmp_path: Path, digits: Path) -> None:
    """A NaN batch of real images: the phases that read it (D, D_r1) skip their optimizer step (D unchanged)
    and are counted, G (which sees only generated images) trains, and the next good batch trains D again."""
    from gen_dist.config import load_config
    from gen_dist.engine import Trainer

    cfg = load_config(smoke_args("gan", tmp_path / "gan", digits)[0],
                      smoke_args("gan", tmp_path / "gan", digits)[1:] + ["wandb.enabled=false"])
    trainer = Trainer(cfg)
    batch = next(trainer._batches())
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in trainer.modules.items()}
    stats = trainer.train_step([{**batch, "x": torch.full_like(batch["x"], float("nan"))}])
    assert stats["nonfinite_skips"].item() == 2  # D and D_r1 (it runs at step 0)
    assert not math.isfinite(stats["D/grad_norm"].item()) and math.isfinite(stats["G/grad_norm"].item())
    assert all(torch.equal(v, before["D"][k]) for k, v in trainer.modules["D"].state_dict().items())
    assert any(not torch.equal(v, before["G"][k]) for k, v in trainer.modules["G"].state_dict().items())
    assert trainer.state.nonfinite == 1
    stats = trainer.train_step([batch])
    assert stats["nonfinite_skips"].item() == 0 and trainer.state.nonfinite == 0
    assert any(not torch.equal(v, before["D"][k]) for k, v in trainer.modules["D"].state_dict().items())


@pytest.mark.parametrize("launch", [["train"], ["launch", "--nproc", "2", "parallel.strategy=deepspeed"]],
                         ids=["ddp-1proc", "zero2-2ranks"])
def test_repeated_nonfinite_steps_stop_the_run(launch: list[str], tmp_path: Path, digits: Path) -> None:
    """A diverging run (lr 1e6) stops on every rank after 3 skipped steps in a row, naming the last checkpoint."""
    run_dir = tmp_path / "vae"
    proc = run_cli(launch[0], *smoke_args("vae", run_dir, digits), "optim.lr=1e6", "optim.grad_clip=0",
                   "train.steps=40", "train.ckpt_every=2", "train.max_nonfinite_steps=3", *launch[1:], check=False)
    assert proc.returncode != 0  # 2 from gen-dist train; the launcher reports its failed children as 1
    assert "3 steps in a row" in proc.stderr and "The last good checkpoint is" in proc.stderr
    skipped = events(run_dir, "nonfinite")
    assert [e["in_a_row"] for e in skipped][-3:] == [1, 2, 3]


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path: Path, digits: Path) -> None:
    """The run directory on a tmpfs with room for less than one more checkpoint."""
    import shutil
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    work = tmp_path / "work"
    run_cli("train", *smoke_args("vae", work, digits), "train.steps=2", "train.ckpt_every=2", "wandb.enabled=false")
    used = sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
    ckpt = sum(f.stat().st_size for f in (work / "checkpoints" / "step_00000002").rglob("*") if f.is_file())
    disk = tmp_path / "disk"
    disk.mkdir()
    size = (used + ckpt // 2) // 4096 * 4096 + 8 * 4096  # page-rounded; a few pages for logs and directories
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], check=True)
    try:
        shutil.copytree(work, disk / "run")
        proc = run_cli("train", *smoke_args("vae", disk / "run", digits), "train.steps=4", "train.ckpt_every=1",
                       "wandb.enabled=false", check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "checkpoint of step 3 was not written" in proc.stderr and "earlier checkpoints are intact" in proc.stderr
        assert checkpoint.latest(disk / "run").name == "step_00000002"
        assert not list((disk / "run" / "checkpoints").glob(".tmp_*"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)
