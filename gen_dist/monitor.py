"""`gen-dist status` and `gen-dist plot`: what a run directory tells about its run, read from its files alone
(metrics.jsonl, config.yaml, heartbeat.json, best.json, checkpoints/, samples/), so they work on a run that is
training, finished or dead, from any machine that sees the directory."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from gen_dist.schema import ConfigError

COUNTED = ("resume", "preempted", "bad_data", "nonfinite")
"""Events whose number so far the status reports: each one is a sign of trouble or of a restart."""
RATE_WINDOW = 5
"""Newest step records of the current session the ETA's steps/s is measured over."""
STALE_S = 600.0
"""A heartbeat from another host older than max(STALE_S, 5 x its refresh interval) means a dead run."""
SLURM_TIMEOUT_S = 10.0


def halt_marker(status: str) -> str:
    """The file a run writes into its directory when it ends early with `status`, naming its last checkpoint."""
    return f"{status}.json"


PREEMPTED = halt_marker("preempted")
"""Written when a signal stopped the run after a checkpoint; job scripts requeue on it."""


# ------------------------------------------------------------------------------------------ reading a run


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl in order; a line that does not parse (one cut short by a kill) is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def step_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "event" not in r and isinstance(r.get("step"), int)]


def read_json(path: Path) -> dict[str, Any] | None:
    """A small JSON object file, or None where it is missing or (being rewritten) unreadable."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _config(run_dir: Path) -> dict[str, Any]:
    """config.yaml as plain data: only a few keys are needed, and a run's config must stay readable even when
    this version of gen_dist would reject it."""
    try:
        found = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return found if isinstance(found, dict) else {}


def check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory")
    if not (run_dir / "config.yaml").is_file() and not (run_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (it has no config.yaml and no metrics.jsonl)")


# ------------------------------------------------------------------------------------------ facts


def _latest_with(steps: list[dict[str, Any]], want: Any) -> dict[str, Any] | None:
    """The newest step record with a key for which want(key) holds."""
    return next((r for r in reversed(steps) if any(want(k) for k in r)), None)


def _is_loss(key: str) -> bool:
    return key.endswith("/loss")


def _is_eval(key: str) -> bool:
    return key.startswith("eval/")


def _session(records: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The newest start event and the step records after it: rates measured across a restart would count the
    time the run was down."""
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    if not starts:
        return None, step_records(records)
    return records[starts[-1]], step_records(records[starts[-1] + 1:])


def steps_per_s(records: list[dict[str, Any]]) -> float | None:
    """Recent training speed: steps over seconds across the newest step records of this session, else
    images/s over the global batch where there is only one."""
    start, steps = _session(records)
    timed = [r for r in steps if "images_per_s" in r and isinstance(r.get("time"), (int, float))][-RATE_WINDOW:]
    if len(timed) >= 2 and timed[-1]["time"] > timed[0]["time"] and timed[-1]["step"] > timed[0]["step"]:
        return (timed[-1]["step"] - timed[0]["step"]) / (timed[-1]["time"] - timed[0]["time"])
    batch = (start or {}).get("global_batch")
    if timed and isinstance(batch, int) and batch > 0 and timed[-1]["images_per_s"] > 0:
        return timed[-1]["images_per_s"] / batch
    return None


def _progress(records: list[dict[str, Any]], total: int | None, heartbeat: dict[str, Any] | None) -> dict[str, Any]:
    train = _latest_with(step_records(records), lambda k: k == "images_per_s")
    beat = (heartbeat or {}).get("step")
    # The heartbeat has the step too, for runs whose track.backends leave out metrics.jsonl.
    step = train["step"] if train else beat if isinstance(beat, int) and beat > 0 else None
    rate = steps_per_s(records)
    done = step is not None and total is not None and total > 0
    return {"step": step, "total": total, "percent": 100.0 * step / total if done else None,
            "images_per_s": train["images_per_s"] if train else None, "steps_per_s": rate,
            "eta_s": (total - step) / rate if done and rate and step < total else None}


def _scores(records: list[dict[str, Any]]) -> dict[str, Any]:
    steps = step_records(records)
    losses = _latest_with(steps, _is_loss) or {}
    evals = _latest_with(steps, _is_eval) or {}
    return {"losses": {k: v for k, v in losses.items() if _is_loss(k)}, "loss_step": losses.get("step"),
            "eval": {k: v for k, v in evals.items() if _is_eval(k)}, "eval_step": evals.get("step")}


def _newest_sample(run_dir: Path) -> Path | None:
    found = [p for p in (run_dir / "samples").glob("step_*.png") if p.stem[5:].isdigit()]
    return max(found, key=lambda p: int(p.stem[5:]), default=None)


def _files(run_dir: Path) -> dict[str, Any]:
    from gen_dist.checkpoint import list_checkpoints

    ckpts = list_checkpoints(run_dir)
    sample = _newest_sample(run_dir)
    return {"checkpoint": str(ckpts[-1]) if ckpts else None, "checkpoints": len(ckpts),
            "samples": str(sample) if sample else None, "best": read_json(run_dir / "best.json")}


def _last_event(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in reversed(records) if "event" in r), None)


def status(run_dir: Path) -> dict[str, Any]:
    """The facts `gen-dist status` reports about a run directory, as plain data."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    records = read_records(run_dir)
    cfg = _config(run_dir)
    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    heartbeat = read_json(run_dir / "heartbeat.json")
    total = next((t for t in (train.get("steps"), (heartbeat or {}).get("total")) if isinstance(t, int)), None)
    alive, why = liveness(heartbeat)
    job = str((heartbeat or {}).get("slurm_job_id") or "")
    return {"run_dir": str(run_dir), "name": cfg.get("name"), "task": cfg.get("task"),
            **_progress(records, total, heartbeat), **_scores(records), **_files(run_dir),
            "events": {name: sum(r.get("event") == name for r in records) for name in COUNTED},
            "last_event": _last_event(records), "heartbeat": heartbeat, "alive": alive, "alive_reason": why,
            "slurm_job_id": job, "slurm": slurm_state(job) if job else None, "checked": time.time()}


# ------------------------------------------------------------------------------------------ liveness


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    except OSError:
        return False
    return True


def liveness(heartbeat: dict[str, Any] | None, now: float | None = None) -> tuple[bool | None, str]:
    """(alive: True, False or None for unknown, why). A running heartbeat on this host is checked against its
    process; one from another host can only be judged by its age."""
    if heartbeat is None:
        return None, "unknown (no heartbeat.json)"
    state, host, pid = heartbeat.get("state"), str(heartbeat.get("host", "?")), heartbeat.get("pid")
    age = (time.time() if now is None else now) - float(heartbeat.get("time") or 0)
    where = f"pid {pid} on {host}, heartbeat {duration(age)} ago"
    if state not in ("running", "starting"):
        return False, f"{state} ({where})"
    if host == socket.gethostname():
        if isinstance(pid, int) and pid > 0 and pid_exists(pid):
            return True, f"{state} ({where})"
        return False, f"process gone without a final heartbeat ({where})"
    limit = max(STALE_S, 5 * float(heartbeat.get("log_every_s") or 0))
    if age < limit:
        return True, f"{state} ({where})"
    return False, f"heartbeat stale (older than {duration(limit)}; {where})"


def _run(cmd: list[str]) -> str | None:
    """First line of a command's output, or None where it failed, timed out or printed nothing."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SLURM_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = proc.stdout.strip().splitlines()
    return lines[0].strip() if proc.returncode == 0 and lines else None


def slurm_state(job_id: str) -> str:
    """The job's state from squeue (queued or running jobs), else from sacct (the accounting of finished ones)."""
    queries = [["squeue", "-h", "-j", job_id, "-o", "%T"], ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"]]
    present = [q for q in queries if shutil.which(q[0])]
    if not present:
        return "unknown (no squeue/sacct)"
    for query in present:
        state = _run(query)
        if state:
            return state
    return f"unknown ({'/'.join(q[0] for q in present)} gave no state)"


# ------------------------------------------------------------------------------------------ the report


def duration(seconds: float) -> str:
    """75 -> '1m15s', 12345 -> '3h25m'; '?' when unknown."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _values(scores: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in scores.items())


def _step_line(f: dict[str, Any]) -> str:
    total = f["total"] if f["total"] is not None else "?"
    if f["step"] is None:
        return f"no step logged yet (of {total})"
    line = f"{f['step']} / {total}"
    if f["percent"] is not None:
        line += f" ({f['percent']:.1f}%)"
    if f["images_per_s"] is not None:
        line += f"   {f['images_per_s']:.4g} images/s"
    if f["eta_s"] is not None and f["alive"] is not False:
        line += f"   ETA {duration(f['eta_s'])}"
    return line


def _alive_line(f: dict[str, Any]) -> str:
    word = {True: "yes", False: "no", None: "unknown"}[f["alive"]]
    line = f"{word}: {f['alive_reason']}" if f["alive"] is not None else f["alive_reason"]
    last = f["last_event"]
    if f["alive"] is None and last:
        line += f"; last event {last['event']} {duration(f['checked'] - float(last.get('time', 0)))} ago"
    return line


def _best_line(best: dict[str, Any]) -> str:
    value = best.get("value")
    shown = f"{value:.4g}" if isinstance(value, (int, float)) else value
    return f"{best.get('metric')} {shown} at step {best.get('step')}: {best.get('path')}"


def format_status(facts: dict[str, Any]) -> str:
    """The compact human-readable report of status()'s facts."""
    f = facts
    title = " ".join(str(x) for x in (f["name"], f["task"] and f"({f['task']})") if x)
    rows = [("run", f"{f['run_dir']}" + (f"  {title}" if title else "")), ("step", _step_line(f)),
            ("alive", _alive_line(f))]
    if f["slurm_job_id"]:
        rows.append(("slurm", f"job {f['slurm_job_id']}: {f['slurm']}"))
    if f["losses"]:
        rows.append(("losses", f"{_values(f['losses'])}  (step {f['loss_step']})"))
    if f["eval"]:
        scores = {k: v for k, v in f["eval"].items() if k != "eval/seconds"}
        rows.append(("eval", f"{_values(scores)}  (step {f['eval_step']})"))
    ckpt = f"{f['checkpoint']}  ({f['checkpoints']} complete)" if f["checkpoint"] else "none yet"
    rows += [("ckpt", ckpt), ("samples", f["samples"] or "none yet")]
    if f["best"]:
        rows.append(("best", _best_line(f["best"])))
    rows.append(("events", ", ".join(f"{n} {name}" for name, n in f["events"].items())))
    return "\n".join(f"{key:<8} {value}" for key, value in rows)


def finished(facts: dict[str, Any]) -> bool:
    """Whether the run is no longer alive. Without a heartbeat (a run still starting, or one older than
    heartbeats) only a final event tells."""
    if facts["alive"] is None:
        return (facts["last_event"] or {}).get("event") in ("end", "preempted")
    return not facts["alive"]


def watch(run_dir: Path, every: float) -> None:
    """Reprint the status every `every` seconds until the run is no longer alive, then once more."""
    while True:
        facts = status(run_dir)
        print(time.strftime("%Y-%m-%d %H:%M:%S"), flush=True)
        print(format_status(facts) + "\n", flush=True)
        if finished(facts):
            return
        time.sleep(every)


# ------------------------------------------------------------------------------------------ plot


def curves(records: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """{key: (steps, values)} of every numeric key of the step records, sorted by step. A resumed run logs
    again the steps after its checkpoint: the last record of a (step, key) wins, so curves do not zig-zag."""
    points: dict[str, dict[int, float]] = {}
    for r in step_records(records):
        for k, v in r.items():
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                points.setdefault(k, {})[r["step"]] = float(v)
    return {k: (sorted(p), [p[s] for s in sorted(p)]) for k, p in points.items()}


def _eval_kind(key: str) -> str:
    """The panel of an eval metric: eval/inception/fid1k -> fid; precision and recall share one."""
    kind = re.sub(r"\d+k?$", "", key.rsplit("/", 1)[-1])
    return "precision / recall" if kind in ("precision", "recall") else kind


def panels(series: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(title, keys) of each panel that has data: losses, learning rates, throughput, one per eval metric kind
    (FID and IS differ by orders of magnitude and must not share an axis)."""
    evals: dict[str, list[str]] = {}
    for k in sorted(series):
        if (_is_eval(k) or k.startswith("snapshots/")) and k != "eval/seconds":
            evals.setdefault(_eval_kind(k), []).append(k)
    found = [("loss", sorted(k for k in series if _is_loss(k))),
             ("learning rate", sorted(k for k in series if k.startswith("lr/"))),
             ("images/s", [k for k in ("images_per_s",) if k in series]),
             *((f"eval: {kind}", keys) for kind, keys in evals.items())]
    return [(title, keys) for title, keys in found if keys]


def _draw(ax: Any, title: str, keys: list[str], series: dict[str, Any], span: tuple[float, float]) -> None:
    for k in keys:
        steps, values = series[k]
        ax.plot(steps, values, label=k, marker="o" if len(steps) <= 30 else None, markersize=3)
    finite = [v for k in keys for v in series[k][1] if math.isfinite(v)]
    # Losses and FIDs that span decades read better on a log axis; a throughput dip does not.
    if title != "images/s" and finite and min(finite) > 0 and max(finite) / min(finite) > 30:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlim(*span)  # the same steps on every panel: sparse eval points line up with the training curves
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot(run_dir: Path, out: Path) -> Path:
    """One PNG of a run's curves, a panel per quantity (see panels)."""
    check_run_dir(run_dir)
    series = curves(read_records(run_dir))
    found = panels(series)
    if not found:
        if not (run_dir / "metrics.jsonl").is_file():
            raise ConfigError(f"{run_dir} has no metrics.jsonl (does track.backends leave out jsonl?): nothing to plot")
        raise ConfigError(f"{run_dir}: no step logged in metrics.jsonl yet, nothing to plot")
    import matplotlib  # only here: the status command and the trainer never need it

    matplotlib.use("Agg")  # files only, and no display on a cluster node
    import matplotlib.pyplot as plt

    cols = min(2, len(found))
    rows = math.ceil(len(found) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False)
    steps = [step for _, keys in found for key in keys for step in series[key][0]]
    pad = max(1.0, 0.03 * (max(steps) - min(steps)))
    span = (min(steps) - pad, max(steps) + pad)
    for i, ax in enumerate(axes.flat):
        if i < len(found):
            _draw(ax, *found[i], series, span)
        else:
            ax.set_visible(False)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------ command line
