"""Standalone sampling from a checkpoint directory, without a process group."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from gen_dist import checkpoint
from gen_dist.config import ConfigError, load_config
from gen_dist.images import save_images, to_uint8
from gen_dist.tasks import TASKS


def resolve(path: Path) -> Path:
    """A checkpoint directory, or the latest checkpoint of a run directory."""
    if (path / checkpoint.META).is_file():
        return path
    found = checkpoint.latest(path)
    if found is None:
        raise ConfigError(f"{path} is neither a checkpoint nor a run directory with checkpoints")
    return found


def module_weights(ckpt: Path, name: str, use_ema: bool) -> dict[str, torch.Tensor]:
    meta = json.loads((ckpt / checkpoint.META).read_text())
    if use_ema and (ckpt / checkpoint.EMA).exists():
        ema = load_file(str(ckpt / checkpoint.EMA))
        return {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}
    i = meta["modules"].index(name)
    return load_file(str(ckpt / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")))


@torch.no_grad()
def sample_checkpoint(path: Path, n: int, out: Path, seed: int = 0, use_ema: bool = True) -> Path:
    ckpt = resolve(path)
    cfg = load_config(ckpt.parent.parent / "config.yaml")
    task = TASKS[cfg.task](cfg)
    net = task.modules[task.ema_module]
    net.load_state_dict(module_weights(ckpt, task.ema_module, use_ema))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net.to(device).eval()
    images = task.sample(net, task.sample_labels(n, device), n, torch.Generator().manual_seed(seed))
    save_images(to_uint8(images), out, nrow=10 if task.num_classes else 0)
    return out
