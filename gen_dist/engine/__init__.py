"""The one training loop (`Trainer`) and what it keeps and is told between steps."""

from gen_dist.engine.state import Supervisor, TrainState
from gen_dist.engine.trainer import Trainer

__all__ = ["Supervisor", "TrainState", "Trainer"]
