"""Samples of a model: the sample set of a seed made in fixed chunks (grids, `gen-dist sample`, evaluation), spread
over the ranks where there are several."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from gen_dist import dist
from gen_dist.artifact import load_model
from gen_dist.family import Task
from gen_dist.images import quantize, save_images, to_hwc, to_model_range
from gen_dist.schema import ConfigError


def sample_chunk(task: Task, net: nn.Module, seed: int, start: int, size: int, device: torch.device,
                 autocast: Callable[[], AbstractContextManager]) -> torch.Tensor:
    """Images [start, start + size) of the sample set of `seed` (uint8, N C H W). Each chunk has its own seed and
    the labels of its positions, so a set made in chunks of one size is the same however the chunks are spread
    over ranks: grids, `gen-dist sample` and evaluation all make their samples this way. An autoencoder's
    samples are its reconstructions of the evaluation split's images at the same positions."""
    if task.reconstructs:
        with autocast():
            return quantize(task.reconstruct(net, to_model_range(task.real_images(start, size).to(device))).float())
    gen = torch.Generator().manual_seed(dist.derive_seed(seed, start))
    labels = task.sample_labels(start + size, device)
    with autocast():
        images = task.sample(net, None if labels is None else labels[start:], size, gen).float()
    return quantize(images)


def rank_chunks(n: int, chunk: int, acc: Accelerator) -> tuple[range, int]:
    """This rank's contiguous run of the ceil(n / chunk) chunks, and the most chunks any rank takes."""
    chunks = math.ceil(n / chunk)
    per_rank = math.ceil(chunks / acc.num_processes)
    first = acc.process_index * per_rank
    return range(first, min(chunks, first + per_rank)), per_rank


def generate(n: int, chunk: int, make: Callable[[int, int], torch.Tensor], shape: tuple[int, ...],
             acc: Accelerator) -> torch.Tensor:
    """`n` images made by `make(start, size)` (uint8, `shape` each) in chunks spread over the ranks, gathered on
    every rank in image order."""
    mine, per_rank = rank_chunks(n, chunk, acc)
    padded = torch.zeros((per_rank * chunk, *shape), dtype=torch.uint8, device=acc.device)
    done = 0
    for c in mine:
        images = make(c * chunk, min(chunk, n - c * chunk))
        padded[done : done + len(images)] = images.to(acc.device)
        done += len(images)
    return dist.gather_cat(acc, padded)[:n]


@torch.no_grad()
def sample_checkpoint(path: Path, n: int, out: Path, seed: int = 0, use_ema: bool = True,
                      overrides: list[str] = (), only_class: int | None = None, prompts: list[str] = ()) -> Path:
    """`n` images from a checkpoint directory, a run directory or an exported .safetensors file: the sample set
    of `seed` that training's grids (with train.seed) and evaluation (with eval.seed) make."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, task, net = load_model(path, use_ema, device, overrides)
    if only_class is not None:
        if not 0 <= only_class < task.num_classes:
            raise ConfigError(f"--class {only_class}: the model has {task.num_classes} classes"
                              + (f" (0 .. {task.num_classes - 1})" if task.num_classes else " (unconditional)"))
        task.only_class = only_class
    if prompts:
        if not task.prompted:
            raise ConfigError(f"--prompt: {path} is a {cfg.task} model without text conditioning")
        task.prompts = list(prompts)
    chunk = cfg.eval.batch_size
    images = torch.cat([sample_chunk(task, net, seed, start, min(chunk, n - start), device, nullcontext)
                        for start in range(0, n, chunk)])
    save_images(to_hwc(images), out, nrow=min(len(prompts), 16) if prompts else 10 if task.num_classes else 0)
    return out
