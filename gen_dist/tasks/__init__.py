"""Model families, as a registry of constructors imported on first use: a GAN run does not pay for importing
diffusers."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from gen_dist.tasks.base import Phase, Task

_WHERE = {"diffusion": "DiffusionTask", "gan": "GANTask", "vae": "VAETask", "classifier": "ClassifierTask"}


class _Registry(Mapping[str, type[Task]]):
    def __getitem__(self, name: str) -> type[Task]:
        return getattr(importlib.import_module(f"gen_dist.tasks.{name}"), _WHERE[name])

    def __iter__(self) -> Iterator[str]:
        return iter(_WHERE)

    def __len__(self) -> int:
        return len(_WHERE)


TASKS: Mapping[str, type[Task]] = _Registry()

__all__ = ["TASKS", "Phase", "Task"]
