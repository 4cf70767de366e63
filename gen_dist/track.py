"""Metrics to W&B (through Accelerate's tracker) and to local files a person can read."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from gen_dist import dist
from gen_dist.config import RunConfig

RUN_ID_FILE = "wandb_run_id"


def wandb_mode(cfg: RunConfig) -> str | None:
    """The W&B mode to use, or None when W&B is off. Never a mode that would prompt for a login."""
    if not cfg.wandb.enabled or cfg.wandb.mode == "disabled":
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
    return init


class Tracker:
    """Writes metrics.jsonl and train.log on the main process and forwards to Accelerate's trackers."""

    def __init__(self, acc: Any, cfg: RunConfig, run_dir: Path) -> None:
        self.acc, self.run_dir = acc, run_dir
        self.main = dist.is_main()
        self.use_wandb = wandb_mode(cfg) is not None
        if self.main:
            # Held open for the whole run, line-buffered so a killed run keeps every record written.
            self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
            self.text = open(run_dir / "train.log", "a", buffering=1)  # noqa: SIM115

    def event(self, name: str, **fields: Any) -> None:
        if self.main:
            record = {"event": name, "time": time.time(), **fields}
            self.jsonl.write(json.dumps(record) + "\n")
            self.text.write(f"[{time.strftime('%H:%M:%S')}] {name}: "
                            + ", ".join(f"{k}={v}" for k, v in fields.items()) + "\n")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.main:
            self.jsonl.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
            self.text.write(f"step {step:>7} | " + " | ".join(f"{k} {v:.4g}" for k, v in metrics.items()) + "\n")
        if self.use_wandb:
            self.acc.log(metrics, step=step)

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        if self.use_wandb and self.main:
            self.acc.get_tracker("wandb").log_images({name: [image]}, step=step)

    def close(self) -> None:
        if self.main:
            self.jsonl.close()
            self.text.close()
