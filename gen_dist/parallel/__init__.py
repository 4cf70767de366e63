"""How trained modules are spread over ranks and stepped: DDP, DeepSpeed ZeRO 1/2/3 or FSDP2.

`parallel.strategy` selects one `Strategy` (STRATEGIES); it answers every question whose answer depends on the
strategy: the checks of its settings, the launcher and Accelerator settings, autocast, how modules are wrapped,
where a rank's part of a weight lives and what a checkpoint holds. The engine holds one `TrainedModule` per
trained module and an `EMA`; neither the loop nor the tasks know which strategy runs. DeepSpeed gets one engine
per trained module (a GAN has two), each from its own plugin of the same Accelerator. Under every strategy the
parameters stay fp32 and mixed precision is autocast, so the numerics of a ZeRO or FSDP run match DDP's."""

from gen_dist.parallel.blocks import blocks, compile_block_forwards, compile_blocks, shard_units
from gen_dist.parallel.deepspeed_config import check_deepspeed, deepspeed_config
from gen_dist.parallel.ema import EMA, warmed_decay
from gen_dist.parallel.layouts import FSDP2Shards, Replicated, WeightLayout, Zero3Partitions, full_state_dict
from gen_dist.parallel.stepping import NonFiniteError, TrainedModule
from gen_dist.parallel.strategies import STRATEGIES, Strategy, adopt_launcher_strategy, strategy_for
from gen_dist.parallel.trained import (
    is_partial,
    set_trainable,
    train_all,
    train_only,
    trained_named_parameters,
    trained_parameters,
)

__all__ = ["EMA", "STRATEGIES", "FSDP2Shards", "NonFiniteError", "Replicated", "Strategy", "TrainedModule",
           "WeightLayout", "Zero3Partitions", "adopt_launcher_strategy", "blocks", "check_deepspeed",
           "compile_block_forwards", "compile_blocks", "deepspeed_config", "full_state_dict", "is_partial",
           "set_trainable", "shard_units", "strategy_for", "train_all", "train_only", "trained_named_parameters",
           "trained_parameters", "warmed_decay"]
