"""Checkpoints: a directory per step, written under a temporary name and renamed once complete."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from gen_dist import dist

META = "meta.json"
EMA = "ema.safetensors"
WEIGHTS = "weights.safetensors"
"""Consolidated raw weights of the sampled module, written when the strategy shards the saved state."""


def ckpt_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A directory without its meta file never finished writing."""
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest(run_dir: Path) -> Path | None:
    for path in reversed(list_checkpoints(run_dir)):
        try:
            json.loads((path / META).read_text())
            return path
        except (OSError, ValueError) as e:
            warnings.warn(f"skipping unreadable checkpoint {path}: {e}", stacklevel=2)
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(acc: Accelerator, run_dir: Path, step: int, meta: dict[str, Any],
         files: dict[str, dict[str, torch.Tensor]], keep: int) -> Path:
    """Every rank writes its part of the state; the main rank adds `files` (name -> consolidated tensors) and
    publishes the directory by renaming it."""
    root = ckpt_root(run_dir)
    final, tmp = root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()  # every rank's files are in `tmp` before it is renamed
    if dist.is_main():
        for name, tensors in files.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / name))
        (tmp / META).write_text(json.dumps({"step": step, **meta}, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load(acc: Accelerator, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restore prepared modules/optimizers/schedulers in place; return (meta, EMA tensors)."""
    acc.load_state(str(path))
    meta = json.loads((path / META).read_text())
    ema = load_file(str(path / EMA)) if (path / EMA).exists() else None
    return meta, ema
