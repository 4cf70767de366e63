"""Checkpoints that are broken or unsafe are skipped in favour of the previous one; a failed save loses nothing."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import events, run_cli, smoke_args, step_records, train_command
from safetensors.torch import load_file

from gen_dist import checkpoint
from gen_dist.data import DataError


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = checkpoint.latest(run_dir)
    return {**load_file(str(ckpt / "model.safetensors")), **load_file(str(ckpt / "model_1.safetensors"))}


def _train(run_dir: Path, digits: Path, *extra: str):
    return run_cli("train", *smoke_args("gan", run_dir, digits), "train.ckpt_every=3", "track.backends=[jsonl]", *extra)


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
                      smoke_args("gan", tmp_path / "gan", digits)[1:] + ["track.backends=[jsonl]"])
    trainer = Trainer(cfg)
    batch = next(trainer.feed.batches())
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
    run_cli("train", *smoke_args("vae", work, digits), "train.steps=2", "train.ckpt_every=2", "track.backends=[jsonl]")
    used = sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
    ckpt = sum(f.stat().st_size for f in (work / "checkpoints" / "step_00000002").rglob("*") if f.is_file())
    disk = tmp_path / "disk"
    disk.mkdir()
    size = (used + ckpt // 2) // 4096 * 4096 + 8 * 4096  # page-rounded; a few pages for logs and directories
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], check=True)
    try:
        shutil.copytree(work, disk / "run")
        proc = run_cli("train", *smoke_args("vae", disk / "run", digits), "train.steps=4", "train.ckpt_every=1",
                       "track.backends=[jsonl]", check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "checkpoint of step 3 was not written" in proc.stderr and "earlier checkpoints are intact" in proc.stderr
        assert checkpoint.latest(disk / "run").name == "step_00000002"
        assert not list((disk / "run" / "checkpoints").glob(".tmp_*"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _keys_in_order(run_dir: Path) -> list[str]:
    """Sample keys consumed by the run, step by step and rank by rank."""
    by_step: dict[tuple[int, int], list[str]] = {}
    for f in run_dir.glob("keys_rank*.jsonl"):
        rank = int(f.stem.removeprefix("keys_rank"))
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            by_step[(rec["step"], rank)] = rec["keys"]
    return [k for _, keys in sorted(by_step.items()) for k in keys]


def _launch(nproc: int, *args: str):
    return run_cli(*train_command(nproc, *args))


@pytest.mark.parametrize(("task", "strategy", "first", "then"),
                         [("gan", "ddp", 2, 1), ("vae", "ddp", 1, 2), ("vae", "fsdp", 2, 1)])
def test_resume_on_another_world_size_reads_each_sample_of_the_epoch_once(
        task: str, strategy: str, first: int, then: int, tmp_path: Path, digits: Path) -> None:
    """Stopped mid-epoch on `first` ranks, resumed on `then`: the epoch's samples are each trained on exactly
    once, and the run goes on into the next epoch."""
    from gen_dist.data import batch_sizes, load_index

    run_dir = tmp_path / "run"
    args = [*smoke_args(task, run_dir, digits), "train.log_keys=true", "track.backends=[jsonl]",
            "train.ckpt_every=1000", f"parallel.strategy={strategy}", "data.batch_size=16"]
    _launch(first, *args, "train.steps=10")
    total = load_index(digits)["splits"]["train"]["count"]
    left = total - 10 * 16 * first
    rest = len(batch_sizes(left, then, 1, 16)[0][0])
    _launch(then, *args, f"train.steps={10 + rest + 3}")
    keys = _keys_in_order(run_dir)
    epoch0 = keys[:total]
    assert len(set(epoch0)) == total  # every sample once: none repeated, none skipped
    assert len(keys) == total + 3 * 16 * then and set(keys[total:]) <= set(epoch0)
    changed = events(run_dir, "data_layout_changed")
    assert [e["saved"][0] for e in changed] == [first] and [e["now"][0] for e in changed] == [then]
    assert events(run_dir, "resume")[0]["step"] == 10
    assert all(math.isfinite(v) for r in step_records(run_dir) for k, v in r.items() if k.endswith("loss"))


def test_zero_checkpoint_on_another_world_size_is_refused_before_launch(tmp_path: Path, digits: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*smoke_args("vae", run_dir, digits), "track.backends=[jsonl]", "parallel.strategy=deepspeed",
            "train.steps=2"]
    _launch(2, *args)
    proc = run_cli("train", *args[:-1], "train.steps=4", check=False)
    assert proc.returncode == 2
    assert "holds DeepSpeed ZeRO partitions of 2 ranks, which load only on 2 ranks (not 1)" in proc.stderr
    proc = run_cli("train", *args[:-2], "train.steps=4", check=False)  # ddp now
    assert proc.returncode == 2 and "was written with parallel.strategy=deepspeed" in proc.stderr


def _damaged_copy(digits: Path, dest: Path) -> str:
    """A copy of the digits dataset whose second train shard is garbage from its middle on; returns its name."""
    import shutil

    shutil.copytree(digits, dest)
    tar = dest / "train-000001.tar"
    raw = tar.read_bytes()
    tar.write_bytes(raw[: len(raw) // 2] + os.urandom(len(raw) - len(raw) // 2))
    return tar.name


def test_corrupt_shard_is_counted_and_the_run_goes_on(tmp_path: Path) -> None:
    """2 ranks through one epoch of a dataset with a damaged shard: both ranks train every planned step, the
    damage is reported naming the shard, and data/bad_samples counts exactly the samples lost."""
    from conftest import ROOT

    from gen_dist.data import Piece, pack_digits, read_pieces

    clean = tmp_path / "clean"
    pack_digits(clean, shard_size=300)
    data = tmp_path / "damaged"
    shard = _damaged_copy(clean, data)
    run_dir = tmp_path / "run"
    proc = _launch(2, str(ROOT / "configs" / "smoke_vae.yaml"), f"run_dir={run_dir}", f"data.path={data}",
                   "track.backends=[jsonl]", "train.steps=45", "train.log_every=5")  # 1438 samples / 32
    assert f"{shard}: unreadable after" in proc.stderr
    readable = []
    with pytest.raises(DataError):
        readable += read_pieces([Piece(str(data / shard), 0, 300)])
    bad = sum(r["data/bad_samples"] for r in step_records(run_dir))
    assert bad == 300 - len(readable) > 0
    reports = [s for e in events(run_dir, "bad_data") for s in e["samples"]]
    assert reports and all(shard in s for s in reports)
    assert [r["step"] for r in step_records(run_dir)] == list(range(5, 46, 5))


def test_strict_data_mode_stops_naming_the_shard(tmp_path: Path, digits: Path) -> None:
    data = tmp_path / "damaged"
    shard = _damaged_copy(digits, data)
    proc = run_cli("train", *smoke_args("vae", tmp_path / "run", data), "track.backends=[jsonl]", "train.steps=100",
                   "data.strict=true", check=False)  # one epoch is 90 steps
    assert proc.returncode == 2 and f"{shard}: unreadable after" in proc.stderr


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of the training process with RANK=rank among the launcher's descendants."""

    def parent(pid: int) -> int:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])

    for environ in Path("/proc").glob("[0-9]*/environ"):
        pid = int(environ.parent.name)
        try:
            if f"RANK={rank}".encode() not in environ.read_bytes().split(b"\0"):
                continue
            ancestor = pid
            while ancestor > 1 and ancestor != launcher:
                ancestor = parent(ancestor)
        except OSError:
            continue
        if ancestor == launcher and b"gen_dist\0train" in (environ.parent / "cmdline").read_bytes():
            return pid
    raise AssertionError(f"no rank {rank} process")


def test_sigterm_on_one_rank_stops_all_with_one_checkpoint(tmp_path: Path, digits: Path) -> None:
    """SIGTERM to rank 1 alone: both ranks agree at the next step boundary, write one checkpoint and exit
    cleanly (no rank left waiting in a collective); running the command again resumes at that step."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    run_dir = tmp_path / "run"
    args = [*smoke_args("vae", run_dir, digits), "track.backends=[jsonl]", "train.steps=400", "train.log_every=1",
            "train.ckpt_every=1000"]
    launch = [sys.executable, "-m", "gen_dist", *train_command(2, *args)]
    proc = subprocess.Popen(launch, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not ((run_dir / "metrics.jsonl").exists() and len(step_records(run_dir)) >= 5):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    (stop,) = events(run_dir, "preempted")
    assert stop["signal"] == "SIGTERM" and 5 <= stop["step"] < 400
    assert json.loads((run_dir / "preempted.json").read_text())["step"] == stop["step"]
    assert checkpoint.latest(run_dir).name == f"step_{stop['step']:08d}"
    assert f"stopped by SIGTERM after step {stop['step']}" in out
    _launch(2, *args, "train.steps=" + str(stop["step"] + 3))
    assert [e["step"] for e in events(run_dir, "resume")] == [stop["step"]]
