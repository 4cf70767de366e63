"""Model families, as a plain registry of constructors."""

from gen_dist.tasks.base import Phase, Task
from gen_dist.tasks.diffusion import DiffusionTask
from gen_dist.tasks.gan import GANTask
from gen_dist.tasks.vae import VAETask

TASKS = {"diffusion": DiffusionTask, "gan": GANTask, "vae": VAETask}

__all__ = ["TASKS", "Phase", "Task"]
