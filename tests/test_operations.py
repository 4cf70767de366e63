"""Operating a run: TensorBoard curves that a resumed run continues, progress lines off a terminal, the heartbeat,
and a rank stuck in a collective reported with its step and phase."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, events, run_cli, smoke_args, step_records, train_command
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.xdist_group("operations")


def _board(run_dir: Path) -> EventAccumulator:
    board = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    board.Reload()
    return board


def test_tensorboard_curves_continue_across_a_resume(tmp_path: Path, digits: Path) -> None:
    """Steps 4-6 are logged twice (the checkpoint of step 6 is lost, so the run resumes from step 3): TensorBoard's
    own reader shows every step once, with the values of the resumed run, plus grids, config and events."""
    run_dir = tmp_path / "run"
    args = [*smoke_args("diffusion", run_dir, digits), "train.log_every=1", "track.backends=[jsonl,tensorboard]",
            "train.progress=true", "train.sample_every=2"]
    first = run_cli("train", *args)
    assert "step 2/6 (33.3%)" in first.stderr and "ETA" in first.stderr and "\r" not in first.stderr
    lost = run_dir / "checkpoints" / "step_00000006"
    for f in lost.iterdir():
        f.unlink()
    lost.rmdir()
    run_cli("train", *args, "train.steps=8")
    assert [e["step"] for e in events(run_dir, "resume")] == [3]
    logged = {r["step"]: r["denoise/loss"] for r in step_records(run_dir)}  # the later record of a step wins
    board = _board(run_dir)
    curve = board.Scalars("denoise/loss")
    assert [s.step for s in curve] == list(range(1, 9))
    assert [s.value for s in curve] == pytest.approx([logged[s] for s in range(1, 9)], rel=1e-6)
    assert {"images_per_s", "lr/denoiser"} <= set(board.Tags()["scalars"])
    assert [i.step for i in board.Images("samples")] == [2, 4, 6, 8]
    texts = board.Tags()["tensors"]
    assert "config/text_summary" in texts and "events/resume/text_summary" in texts
    beat = json.loads((run_dir / "heartbeat.json").read_text())
    assert (beat["state"], beat["step"], beat["total"], beat["pid"]) == ("ended", 8, 8, beat["pid"])


def _descendants(pid: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rank_process(launcher: int, rank: int) -> int:
    for pid in _descendants(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    raise AssertionError(f"no process of rank {rank} under {launcher}")


def test_a_rank_stuck_in_a_collective_is_reported_with_its_step_and_phase(tmp_path: Path, digits: Path) -> None:
    """Rank 1 is frozen (SIGSTOP) mid-run. Within parallel.timeout_minutes rank 0 says it is waiting, then its
    collective times out and it reports the step and phase it was in, in stderr, the event log and the
    heartbeat."""
    run_dir, log = tmp_path / "run", tmp_path / "stderr.txt"
    args = train_command(2, *smoke_args("diffusion", run_dir, digits), "train.steps=100000", "train.log_every=1",
                         "train.ckpt_every=100000", "parallel.timeout_minutes=0.15", "track.backends=[jsonl]")
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gen_dist", *args], stdout=subprocess.DEVNULL, stderr=err,
                                env=env, cwd=ROOT, start_new_session=True)
    stopped = None
    try:
        deadline = time.monotonic() + 120
        while not ((run_dir / "metrics.jsonl").exists() and len(step_records(run_dir)) >= 3):
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        stopped = _rank_process(proc.pid, 1)
        os.kill(stopped, signal.SIGSTOP)
        deadline = time.monotonic() + 90
        while "rank 0 failed at" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        if stopped:
            os.kill(stopped, signal.SIGKILL)
        proc.wait(timeout=60) if proc.poll() is None else None
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "gen_dist rank 0: no progress for" in text and "parallel.timeout_minutes=0.15" in text
    (failed,) = events(run_dir, "failed")
    assert f"rank 0 failed at {failed['where']}" in text and failed["where"].startswith(f"step {failed['step']}, ")
    assert failed["step"] >= 3 and "the README's troubleshooting section" in text
    assert json.loads((run_dir / "heartbeat.json").read_text())["state"] == "failed"
