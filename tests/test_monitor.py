"""`gen-dist status` and `gen-dist plot` on a real short run that is resumed to more steps, and the readers of
heartbeat.json, SLURM job state and metrics.jsonl on files written by hand."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import events, run_cli, smoke_args, step_records
from PIL import Image

from gen_dist import monitor
from gen_dist.checkpoint import list_checkpoints
from gen_dist.schema import ConfigError

pytestmark = pytest.mark.xdist_group("monitor")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, digits: Path) -> dict:
    """A 6-step diffusion run, its status, then the same run resumed to 10 steps. The checkpoint of step 6 is lost
    first, so the resumed run starts from step 3 and logs steps 4 and 6 again."""
    run_dir = tmp_path_factory.mktemp("monitor") / "run"
    train = ["train", *smoke_args("diffusion", run_dir, digits), "track.backends=[jsonl]"]
    run_cli(*train)
    first = monitor.format_status(monitor.status(run_dir))
    shutil.rmtree(run_dir / "checkpoints" / "step_00000006")
    run_cli(*train, "train.steps=10")
    return {"dir": run_dir, "first": first}


def _line(report: str, key: str) -> str:
    return next(line for line in report.splitlines() if line.split(" ", 1)[0] == key)


def _assert_ended(report: str, run_dir: Path) -> None:
    """Liveness of a finished run: 'no: ended' from its heartbeat."""
    alive = _line(report, "alive")
    assert alive.split()[1:3] == ["no:", "ended"], alive


def test_status_of_a_run_and_of_its_resumption(run: dict) -> None:
    run_dir, first = run["dir"], run["first"]
    assert "6 / 6 (100.0%)" in _line(first, "step")
    assert _line(first, "events").startswith("events   0 resume")
    assert first.count("step_00000006") == 2  # checkpoint and sample grid

    report = run_cli("status", str(run_dir)).stdout
    last = step_records(run_dir)[-1]
    assert last["step"] == 10
    assert "10 / 10 (100.0%)" in _line(report, "step") and f"{last['images_per_s']:.4g} images/s" in report
    assert _line(report, "losses") == f"losses   denoise/loss {last['denoise/loss']:.4g}  (step 10)"
    ckpt = list_checkpoints(run_dir)[-1]
    assert ckpt.name == "step_00000010" and _line(report, "ckpt").startswith(f"ckpt     {ckpt}  (")
    assert _line(report, "samples") == f"samples  {run_dir / 'samples' / 'step_00000010.png'}"
    assert [e["step"] for e in events(run_dir, "resume")] == [3]
    assert "1 resume, 0 preempted, 0 bad_data, 0 nonfinite" in report
    _assert_ended(first, run_dir)
    _assert_ended(report, run_dir)

    facts = monitor.status(run_dir)
    assert (facts["step"], facts["total"], facts["events"]["resume"]) == (10, 10, 1)
    assert facts["losses"] == {"denoise/loss": last["denoise/loss"]} and facts["checkpoint"] == str(ckpt)


def test_plot_writes_one_png_of_each_step_once(run: dict, tmp_path: Path) -> None:
    logged = step_records(run["dir"])
    assert [r["step"] for r in logged] == [2, 4, 6, 4, 6, 8, 10]
    assert monitor.curves(logged)["denoise/loss"] == ([2, 4, 6, 8, 10],
                                                      [logged[i]["denoise/loss"] for i in (0, 3, 4, 5, 6)])
    out = tmp_path / "plots" / "curves.png"
    proc = run_cli("plot", str(run["dir"]), "--out", str(out))
    assert proc.stdout.strip() == f"wrote {out}"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] >= 800 and image.size[1] >= 300


def test_a_directory_that_is_not_a_run_is_an_error(tmp_path: Path) -> None:
    proc = run_cli("status", str(tmp_path), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("gen-dist: error: ")
    assert f"{tmp_path} is not a run directory" in proc.stderr and len(proc.stderr.splitlines()) == 1
    with pytest.raises(ConfigError, match=f"{tmp_path} is not a run directory"):
        monitor.plot(tmp_path, tmp_path / "x.png")


# ------------------------------------------------------------------------------------------ hand-written runs


def _copy(run: dict, dest: Path) -> Path:
    """The run's config and metrics in a directory of their own, without its heartbeat."""
    dest.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(run["dir"] / name, dest / name)
    return dest


def _beat(run_dir: Path, **fields) -> None:
    beat = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), "step": 10, "total": 10,
            "state": "running", "slurm_job_id": "", "log_every_s": 5.0, **fields}
    (run_dir / "heartbeat.json").write_text(json.dumps(beat))


def _gone_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: its pid names no process now
    return child.pid


def test_liveness_from_the_heartbeat(run: dict, tmp_path: Path) -> None:
    run_dir = _copy(run, tmp_path / "run")
    facts = monitor.status(run_dir)
    assert facts["alive"] is None and monitor.finished(facts)  # no heartbeat, but the end event
    _beat(run_dir)
    assert monitor.status(run_dir)["alive"] is True  # this very process
    _beat(run_dir, pid=_gone_pid())
    facts = monitor.status(run_dir)
    assert facts["alive"] is False and "no: process gone" in monitor.format_status(facts)
    _beat(run_dir, host="elsewhere", pid=1, time=time.time() - 3600)
    assert monitor.status(run_dir)["alive"] is False
    _beat(run_dir, host="elsewhere", pid=1, time=time.time() - 3600, log_every_s=1000.0)  # slow logging
    assert monitor.status(run_dir)["alive"] is True
    _beat(run_dir, host="elsewhere", pid=1, time=time.time() - 60)
    assert monitor.status(run_dir)["alive"] is True
    _beat(run_dir, state="preempted")
    assert "alive    no: preempted" in monitor.format_status(monitor.status(run_dir))


def _fake(bin_dir: Path, name: str, script: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)


def test_slurm_state_without_slurm_and_from_squeue_or_sacct(run: dict, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = _copy(run, tmp_path / "run")
    _beat(run_dir, slurm_job_id="42")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    assert "slurm    job 42: unknown (no squeue/sacct)" in monitor.format_status(monitor.status(run_dir))
    _fake(bin_dir, "squeue", 'echo "squeue: error: Invalid job id specified" >&2; exit 1')
    _fake(bin_dir, "sacct", '[ "$5" = 42 ] && echo COMPLETED')
    assert monitor.status(run_dir)["slurm"] == "COMPLETED"
    _fake(bin_dir, "squeue", '[ "$3" = 42 ] && echo RUNNING')
    assert monitor.status(run_dir)["slurm"] == "RUNNING"
    _fake(bin_dir, "sacct", "exit 1")
    _fake(bin_dir, "squeue", "exit 1")
    assert monitor.status(run_dir)["slurm"].startswith("unknown")


def test_watch_reprints_until_the_run_is_gone(run: dict, tmp_path: Path) -> None:
    run_dir = _copy(run, tmp_path / "run")
    # Outlives the start of `gen-dist status` (an import of torch, seconds), then ends mid-watch.
    trainer = subprocess.Popen(["sleep", "6"])
    threading.Thread(target=trainer.wait, daemon=True).start()  # reaped as it ends, or its pid would live on
    _beat(run_dir, pid=trainer.pid)
    proc = run_cli("status", str(run_dir), "--watch", "0.5", timeout=60)
    reports = proc.stdout.strip().split("\n\n")
    assert len(reports) >= 2 and "alive    yes: running" in reports[0]
    assert "alive    no: process gone" in reports[-1]


def _write_records(run_dir: Path, records: list[dict], tail: str = "") -> None:
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("name: hand\ntask: diffusion\ntrain:\n  steps: 100\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def _train_record(step: int, t: float, loss: float) -> dict:
    return {"step": step, "time": t, "G/loss": loss, "D/loss": 2 * loss, "images_per_s": 64.0, "lr/G": 1e-4}


def test_eval_scores_eta_best_and_a_line_cut_short(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    evals = {"step": 20, "time": 1042.0, "eval/inception/fid1k": 80.5, "eval/inception/precision1k": 0.4,
             "eval/seconds": 30.0}
    _write_records(run_dir, [{"event": "start", "time": 990.0, "step": 0, "global_batch": 32},
                             _train_record(10, 1000.0, 0.5), _train_record(20, 1010.0, 0.4), evals,
                             {"event": "bad_data", "time": 1043.0, "step": 20, "rank": 0, "samples": []}],
                   tail='{"step": 30, "time": 10')
    (run_dir / "best.json").write_text(json.dumps({"metric": "eval/inception/fid1k", "value": 80.5, "step": 20,
                                                   "path": "checkpoints/step_00000020"}))
    facts = monitor.status(run_dir)
    assert (facts["step"], facts["percent"], facts["loss_step"], facts["eval_step"]) == (20, 20.0, 20, 20)
    assert facts["losses"] == {"G/loss": 0.4, "D/loss": 0.8} and facts["steps_per_s"] == pytest.approx(1.0)
    assert facts["eta_s"] == pytest.approx(80.0) and facts["events"]["bad_data"] == 1
    report = monitor.format_status(facts)
    assert "20 / 100 (20.0%)   64 images/s   ETA 1m20s" in report
    assert _line(report, "eval") == "eval     eval/inception/fid1k 80.5  eval/inception/precision1k 0.4  (step 20)"
    assert _line(report, "best") == "best     eval/inception/fid1k 80.5 at step 20: checkpoints/step_00000020"
    assert _line(report, "ckpt") == "ckpt     none yet"


def test_one_step_record_gives_the_eta_from_images_per_s(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _write_records(run_dir, [{"event": "start", "time": 990.0, "step": 0, "global_batch": 32},
                             _train_record(10, 1000.0, 0.5)])
    assert monitor.status(run_dir)["steps_per_s"] == pytest.approx(2.0)


def test_no_step_logged_yet(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _write_records(run_dir, [{"event": "start", "time": 990.0, "step": 0, "global_batch": 32}])
    facts = monitor.status(run_dir)
    assert _line(monitor.format_status(facts), "step") == "step     no step logged yet (of 100)"
    assert not monitor.finished(facts)  # starting: --watch waits for its heartbeat
    with pytest.raises(ConfigError, match="no step logged"):
        monitor.plot(run_dir, tmp_path / "x.png")


def test_curves_keep_the_last_record_of_a_step_logged_again_after_a_resume(tmp_path: Path) -> None:
    first = [_train_record(s, 1000.0 + s, 1.0) for s in (10, 20, 30)]
    again = [_train_record(s, 2000.0 + s, 0.5) for s in (20, 30, 40)]  # resumed from the checkpoint at 10
    evals = [{"step": s, "time": 2100.0 + s, "eval/domain/fid1k": 9.0, "eval/domain/recall1k": 0.5,
              "eval/domain/precision1k": 0.6, "eval/psnr": 20.0, "eval/seconds": 3.0} for s in (20, 40)]
    records = [*first, {"event": "resume", "time": 1999.0, "step": 10}, *again, *evals]
    series = monitor.curves(records)
    assert series["G/loss"] == ([10, 20, 30, 40], [1.0, 0.5, 0.5, 0.5])
    titles = dict(monitor.panels(series))
    assert titles["loss"] == ["D/loss", "G/loss"] and titles["learning rate"] == ["lr/G"]
    assert titles["eval: fid"] == ["eval/domain/fid1k"] and titles["eval: psnr"] == ["eval/psnr"]
    assert titles["eval: precision / recall"] == ["eval/domain/precision1k", "eval/domain/recall1k"]
    assert not any("eval/seconds" in keys for keys in titles.values())
    _write_records(tmp_path / "run", records)
    out = monitor.plot(tmp_path / "run", tmp_path / "curves.png")
    with Image.open(out) as image:
        assert image.size[1] > 3 * 300  # six panels in three rows: loss, lr, images/s and three eval kinds
