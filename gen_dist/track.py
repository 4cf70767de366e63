"""Metrics to W&B, TensorBoard and local files a person can read; progress lines; the run's heartbeat."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tensorboard.compat.proto.summary_pb2 import Summary
from tqdm.auto import tqdm

from gen_dist import dist
from gen_dist.monitor import duration
from gen_dist.schema import RunConfig, TrackConfig, to_dict, write_atomic

RUN_ID_FILE = "wandb_run_id"
HEARTBEAT = "heartbeat.json"


def wandb_mode(cfg: RunConfig) -> str | None:
    """The W&B mode to use, or None when W&B is off. Never a mode that would prompt for a login."""
    if "wandb" not in cfg.track.backends or cfg.wandb.mode == "disabled":
        return None
    if cfg.wandb.mode != "auto":
        return cfg.wandb.mode
    env = os.environ.get("WANDB_MODE")
    if env:
        return "offline" if env == "dryrun" else env
    netrc = Path.home() / ".netrc"
    logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    return "online" if os.environ.get("WANDB_API_KEY") or logged_in else "offline"


def wandb_run_id(run_dir: Path) -> str:
    """One W&B run id per run directory, so that a resumed run continues the same W&B run."""
    path = run_dir / RUN_ID_FILE
    if path.exists():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id)
    return run_id


def wandb_init_kwargs(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    init = {"id": wandb_run_id(run_dir), "resume": "allow", "dir": str(run_dir), "name": cfg.name,
            "mode": wandb_mode(cfg)}
    if cfg.wandb.entity:
        init["entity"] = cfg.wandb.entity
    if cfg.wandb.group:
        init["group"] = cfg.wandb.group
    return init


class Tracker:
    """Where a run's records go, on the main process: train.log (always), metrics.jsonl, TensorBoard (event files
    in <run_dir>/tensorboard) and W&B (through Accelerate's tracker), as track.backends says; and heartbeat.json,
    which tells `gen-dist status` how far the run is and whether it is alive."""

    def __init__(self, acc: Any, cfg: RunConfig, run_dir: Path) -> None:
        self.acc, self.cfg, self.run_dir = acc, cfg, run_dir
        self.main = dist.is_main()
        self.use_wandb = wandb_mode(cfg) is not None
        self.step, self.beat = 0, 0.0
        self.board: Any = None  # made by begin(), once the step a resumed run continues from is known
        self.early: list[tuple[str, dict[str, Any]]] = []  # events before begin(), for TensorBoard
        self.jsonl = self.text = None
        if self.main:
            # Held open for the whole run, line-buffered so a killed run keeps every record written.
            if "jsonl" in cfg.track.backends:
                self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
            self.text = open(run_dir / "train.log", "a", buffering=1)  # noqa: SIM115
        self.heartbeat("starting")  # replaces an earlier process's final state while this one resumes

    def begin(self, step: int, resumed: bool) -> None:
        """Open the dashboards at `step`. TensorBoard drops what an earlier process logged after the step a resumed
        run continues from (those steps are trained and logged again), so curves continue seamlessly."""
        self.step = step
        if self.use_wandb and self.main:
            self.acc.init_trackers(self.cfg.wandb.project, config=to_dict(self.cfg),
                                   init_kwargs={"wandb": wandb_init_kwargs(self.cfg, self.run_dir)})
        if self.main and "tensorboard" in self.cfg.track.backends:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=step + 1 if resumed else None)
            config = yaml.safe_dump(to_dict(self.cfg), sort_keys=False)
            self.board.add_text("config", "```yaml\n" + config + "```", step)
            for name, fields in self.early:
                self._board_event(name, fields)
        self.early.clear()
        self.heartbeat("running")

    def event(self, name: str, **fields: Any) -> None:
        if not self.main:
            return
        record = {"event": name, "time": time.time(), **fields}
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
        self.text.write(f"[{time.strftime('%H:%M:%S')}] {name}: " + ", ".join(f"{k}={v}" for k, v in fields.items())
                        + "\n")
        if self.board is None:
            self.early.append((name, fields))
        else:
            self._board_event(name, fields)

    def _board_event(self, name: str, fields: dict[str, Any]) -> None:
        text = "\n".join(f"- **{k}**: {v}" for k, v in fields.items())
        self.board.add_text(f"events/{name}", text, fields.get("step", self.step))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.step = step
        if self.main:
            if self.jsonl:
                self.jsonl.write(record_line(step, metrics))
            self.text.write(f"step {step:>7} | " + " | ".join(f"{k} {v:.4g}" for k, v in metrics.items()) + "\n")
            if self.board is not None:
                add_scalars(self.board, step, metrics)
            self.heartbeat("running")
        if self.use_wandb:
            self.acc.log(metrics, step=step)

    def image(self, step: int, name: str, image: np.ndarray, caption: str = "") -> None:
        """An image (a sample grid) with what it shows, e.g. the prompt of each column."""
        if not self.main:
            return
        if self.board is not None:
            self.board.add_image(name, image, step, dataformats="HWC" if image.ndim == 3 else "HW")
            if caption:
                self.board.add_text(name, caption, step)
        if self.use_wandb:
            import wandb

            self.acc.get_tracker("wandb").log({name: [wandb.Image(image, caption=caption or None)]}, step=step)

    def heartbeat(self, state: str) -> None:
        """heartbeat.json: host, pid, time, step, total, state (starting, running, ended, preempted, failed), the
        SLURM job and the seconds between the last two beats. Written whole and renamed, so a reader never sees
        half."""
        if not self.main:
            return
        now = time.time()
        beat = {"host": socket.gethostname(), "pid": os.getpid(), "time": now, "step": self.step,
                "total": self.cfg.train.steps, "state": state, "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
                "log_every_s": round(now - self.beat, 3) if self.beat else 0.0}
        self.beat = now
        write_atomic(self.run_dir / HEARTBEAT, json.dumps(beat))

    def close(self, state: str) -> None:
        if self.main:
            self.heartbeat(state)
            for f in (self.jsonl, self.text, self.board):
                if f is not None:
                    f.close()
            self.jsonl = self.text = self.board = None


def record_line(step: int, metrics: dict[str, float]) -> str:
    """A step record of metrics.jsonl."""
    return json.dumps({"step": step, "time": time.time(), **metrics}) + "\n"


def add_scalars(board: Any, step: int, metrics: dict[str, float]) -> None:
    """A record's scalars as one TensorBoard event: 17x cheaper than one add_scalar per key."""
    values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()]
    board._get_file_writer().add_summary(Summary(value=values), step)


def append_records(run_dir: Path, rows: list[tuple[int, dict[str, float]]]) -> None:
    """Scores made after the fact (a run's snapshots) added to its metrics.jsonl and TensorBoard curves, as the
    run's config logs them."""
    backends = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("track", {}).get(
        "backends", TrackConfig().backends)
    if "jsonl" in backends:
        with open(run_dir / "metrics.jsonl", "a") as f:
            for step, values in rows:
                f.write(record_line(step, values))
    if "tensorboard" in backends and rows:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(run_dir / "tensorboard")) as board:
            for step, values in rows:
                add_scalars(board, step, values)


class Progress:
    """Progress on the main process: a tqdm bar when stderr is a terminal; elsewhere (SLURM logs, pipes) one plain
    line per log record, since a bar's redraws turn a log file into noise."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        enabled = enabled and dist.is_main()
        self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True) if enabled and sys.stderr.isatty() else None
        self.plain = enabled and self.bar is None
        self.total, self.initial, self.t0 = total, initial, time.perf_counter()

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def record(self, step: int, metrics: dict[str, float]) -> None:
        losses = {k: v for k, v in metrics.items() if k.endswith("/loss")}
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items()})
        elif self.plain:
            rate = (step - self.initial) / max(time.perf_counter() - self.t0, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            parts = [f"step {step}/{self.total} ({100 * step / self.total:.1f}%)",
                     f"{metrics.get('images_per_s', float('nan')):.1f} img/s", f"ETA {duration(eta)}",
                     *(f"{k} {v:.4g}" for k, v in losses.items())]
            print(" | ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

