"""`gen-dist sweep`: the sweep file checked before any trial, local workers that survive a kill (every trial
finished exactly once, the interrupted ones resumed from their checkpoints), and pruning agreed by every rank of
a 2-process trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import CONFIGS, ROOT, events, run_cli, step_records

from gen_dist import monitor, sweep
from gen_dist.schema import ConfigError

pytestmark = pytest.mark.xdist_group("sweep")


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _base(tmp_path: Path, digits: Path, **extra) -> dict:
    return {"name": "s", "dir": str(tmp_path / "sweep"), "config": str(CONFIGS / "smoke_diffusion.yaml"),
            "overrides": [f"data.path={digits}", "track.backends=[jsonl]", "data.num_workers=0",
                          "train.log_every=1"],
            "space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
                      "diffusion.guidance": {"type": "categorical", "choices": [1.0, 2.0]}},
            "objective": {"metric": "denoise/loss", "direction": "minimize"}, "trials": 4, **extra}


@pytest.mark.parametrize(("change", "message"), [
    ({"space": {"optim.lrr": {"type": "float", "low": 0.1, "high": 0.2}}}, "sweep space 'optim.lrr' = 0.1: unknown"),
    ({"space": {"optim.lr": {"type": "float", "low": 0.2, "high": 0.1}}}, "low 0.2 must be below high 0.1"),
    ({"space": {"optim.lr": {"type": "float", "low": 0, "high": 0.1, "log": True}}}, "a log range needs low > 0"),
    ({"space": {"data.batch_size": {"type": "int", "low": 0, "high": 8}}}, "'data.batch_size' = 0: config key"),
    ({"space": {"diffusion.sampler": {"type": "categorical", "choices": ["ddim", "plms"]}}}, "= 'plms'"),
    ({"space": {"optim.lr": {"type": "normal"}}}, "type: float | int | categorical"),
    ({"objective": {"metric": "eval/inception/fid1k"}}, "not a metric the trials' in-training evaluation logs"),
    ({"pruner": "median"}, "set eval.every > 0"),
    ({"trials": 0}, "'trials' must be an integer >= 1"),
    ({"sampler": "cmaes"}, "'sampler' must be one of tpe, random, grid"),
    ({"budget": 3}, "unknown key(s) budget"),
])
def test_bad_sweep_files_are_refused_naming_the_key(change: dict, message: str, tmp_path: Path, digits: Path) -> None:
    path = _write(tmp_path / "bad.yaml", _base(tmp_path, digits, **change))
    with pytest.raises(ConfigError) as e:
        sweep.load_sweep(path)
    assert message in str(e.value)
    proc = run_cli("sweep", str(path), check=False)  # the command refuses it before any trial
    assert proc.returncode == 2 and message in proc.stderr and not (tmp_path / "sweep").exists()


def _trial_checkpoints(sweep_dir: Path) -> list[Path]:
    return list(sweep_dir.glob("trials/*/checkpoints/step_*"))


def test_killed_sweep_reruns_to_every_trial_once_resuming_the_interrupted(tmp_path: Path, digits: Path) -> None:
    """4 trials on 2 workers; the sweep is killed (-9) once a trial has a checkpoint, leaving its trials running
    without a worker; the same command stops them at a checkpoint, resumes them, and finishes the sweep."""
    path = _write(tmp_path / "sweep.yaml", _base(tmp_path, digits, overrides=[
        *_base(tmp_path, digits)["overrides"], "train.steps=12", "train.ckpt_every=2"]))
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "gen_dist", "sweep", str(path), "--workers", "2"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not _trial_checkpoints(sweep_dir) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.poll() is None, first.stdout.read()
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    interrupted = [d.name for d in sorted(sweep_dir.glob("trials/trial_*"))]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = sorted(sweep_dir.glob("trials/trial_*"))
    assert [d.name for d in trials] == [f"trial_{i:04d}" for i in range(4)]
    resumed = 0
    for run_dir in trials:
        starts = events(run_dir, "start")
        assert [s["resumed"] for s in starts].count(False) == 1  # each trial began once
        assert step_records(run_dir)[-1]["step"] == 12 and events(run_dir, "end")
        resumed += any(s["resumed"] and s["step"] > 0 for s in starts)
        if run_dir.name not in interrupted:
            assert len(starts) == 1
    assert resumed >= 1
    s, rows, best = sweep.rows(sweep_dir)
    assert [r["state"] for r in rows] == ["complete"] * 4
    assert best["value"] == min(r["value"] for r in rows)
    assert f"best: trial {best['number']}" in proc.stdout and "gen-dist launch" in proc.stdout
    status = run_cli("sweep", "status", str(sweep_dir), "--plot", str(tmp_path / "sweep.png"))
    assert "4/4 trials (4 complete)" in status.stdout and (tmp_path / "sweep.png").stat().st_size > 0
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "claimed" not in again.stdout  # nothing left to run
    other = _write(tmp_path / "other.yaml", {**yaml.safe_load(path.read_text()), "trials": 5})
    refused = run_cli("sweep", str(other), check=False)
    assert refused.returncode == 2 and "holds another sweep" in refused.stderr


def test_pruned_trial_stops_on_every_rank_at_the_same_step(tmp_path: Path, digits: Path) -> None:
    """Two 2-process trials on a grid, the median pruner fed by the in-training FID: the trial that does not
    learn (lr 0) is pruned at its second evaluation, on both ranks at that step, with a checkpoint; the study
    records it as pruned."""
    path = _write(tmp_path / "prune.yaml", _base(
        tmp_path, digits, trials=2, sampler="grid", seed=1, pruner="median",
        overrides=[*_base(tmp_path, digits)["overrides"], "train.steps=6", "train.ckpt_every=6", "eval.every=2",
                   "eval.n=16", "eval.reference_n=32", "eval.batch_size=16", "eval.metrics=[fid]"],
        space={"optim.lr": {"type": "categorical", "choices": [0.003, 0.0]}},
        objective={"metric": "eval/inception/fid16", "direction": "minimize"}))
    run_cli("sweep", str(path), "--nproc", "2", "--cpu", timeout=600)
    s, rows, best = sweep.rows(tmp_path / "sweep")
    assert [(r["params"]["optim.lr"], r["state"]) for r in rows] == [(0.003, "complete"), (0.0, "pruned")]
    pruned = Path(rows[1]["run_dir"])
    assert [r["step"] for r in step_records(pruned) if "eval/inception/fid16" in r] == [2, 4]
    assert step_records(pruned)[-1]["step"] == 4 and events(pruned, "pruned")[0]["step"] == 4
    assert (pruned / "checkpoints" / "step_00000004").is_dir()
    assert json.loads((pruned / sweep.PRUNED).read_text())["step"] == 4
    assert json.loads((pruned / "heartbeat.json").read_text())["state"] == "pruned"
    assert events(pruned, "start")[0]["world_size"] == 2
    assert best["number"] == 0


def test_silent_trial_is_taken_over_then_failed(tmp_path: Path, digits: Path) -> None:
    """A trial claimed on another host is left alone while its heartbeat (or claim) is fresh, judged against
    its own interval between beats where that is longer; taken over once it is silent for stale_minutes; and
    recorded as failed when that happens again with no retry left."""
    s = sweep.load_sweep(_write(tmp_path / "s.yaml", _base(tmp_path, digits, trials=1, stale_minutes=1,
                                                            retries=1)))
    sweep.prepare(s)
    study = sweep.open_study(s)
    number, params = sweep.claim_next(s, study)
    run_dir = sweep.trial_dir(s.dir, number)

    def elsewhere(claim_age: float, beat_age: float | None = None, every: float = 0.0) -> None:
        now = time.time()
        (run_dir / sweep.CLAIM).write_text(json.dumps({**sweep.worker_id(), "host": "node-b", "time": now - claim_age}))
        beat = {} if beat_age is None else {"time": now - beat_age, "log_every_s": every, "state": "running"}
        (run_dir / "heartbeat.json").write_text(json.dumps(beat))

    elsewhere(30)
    assert sweep.claim_next(s, study) == sweep.WAIT  # its worker claimed it 30 s ago: nothing to take
    elsewhere(600, beat_age=90, every=30)
    assert sweep.claim_next(s, study) == sweep.WAIT  # beats every 30 s: 90 s of silence is not yet stale
    elsewhere(600, beat_age=90)
    assert sweep.claim_next(s, study) == (number, params)  # taken over, as its one retry
    assert json.loads((run_dir / sweep.CLAIM).read_text())["pid"] == os.getpid()
    elsewhere(600, beat_age=90)
    assert sweep.claim_next(s, study) is None
    trial = sweep.open_study(s).trials[number]
    assert trial.state.name == "FAIL" and trial.system_attrs["fail_reason"] == "no heartbeat for 1 min"
    assert [r["state"] for r in sweep.rows(s.dir)[1]] == ["fail"]


def test_trial_that_stops_beating_is_stopped_and_failed(tmp_path: Path, digits: Path) -> None:
    """A trial whose process stops (SIGSTOP: as a hung collective, it neither beats nor answers signals) is
    killed by its worker after stale_minutes without a heartbeat and, with no retry left, recorded as failed."""
    path = _write(tmp_path / "s.yaml", _base(tmp_path, digits, trials=1, retries=0, stale_minutes=0.5, overrides=[
        *_base(tmp_path, digits)["overrides"], "train.steps=100000", "train.ckpt_every=100000"]))
    run_dir = tmp_path / "sweep" / "trials" / "trial_0000"
    cmd = [sys.executable, "-m", "gen_dist", "sweep", str(path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    beat: dict = {}
    deadline = time.monotonic() + 120
    while beat.get("step", 0) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        beat = monitor.read_json(run_dir / "heartbeat.json") or {}
    assert beat.get("step", 0) >= 2, proc.stdout.read() if proc.poll() is not None else "no heartbeat in 120 s"
    os.kill(beat["pid"], signal.SIGSTOP)
    stopped = time.monotonic()
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert 25 < time.monotonic() - stopped < 90  # stale after 30 s, then at most 10 s to stop it
    assert not monitor.pid_exists(beat["pid"])
    trial = sweep.open_study(sweep.load_sweep(path)).trials[0]
    assert trial.state.name == "FAIL" and trial.system_attrs["fail_reason"] == "no heartbeat for 0.5 min while it ran"
    assert "trial 0: failed (no heartbeat for 0.5 min while it ran)" in out


@pytest.mark.parametrize("name", sorted(p.name for p in (CONFIGS / "sweeps").glob("*.yaml")))
def test_shipped_sweep_files_load(name: str) -> None:
    s = sweep.load_sweep(CONFIGS / "sweeps" / name)
    assert s.space and s.trials >= 1
