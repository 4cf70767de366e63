"""The values of parallel.strategy: DDP, DeepSpeed ZeRO 1/2/3 and FSDP2, one class each."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from gen_dist.dist import free_port
from gen_dist.parallel.blocks import compile_blocks, shard_units
from gen_dist.parallel.deepspeed_config import check_deepspeed, deepspeed_config, read_json
from gen_dist.parallel.layouts import FSDP2Shards, Replicated, WeightLayout, Zero3Partitions
from gen_dist.parallel.stepping import DeepSpeedTrainedModule, FSDPTrainedModule, TrainedModule, swapped
from gen_dist.schema import ConfigError, RunConfig

if TYPE_CHECKING:  # Accelerate is imported where it is used: the launcher's checks do not pay for it
    from accelerate import Accelerator


def adopt_launcher_strategy(cfg: RunConfig) -> None:
    """`accelerate launch --use_deepspeed ...` / `--use_fsdp` (or an accelerate config saying so) selects the
    strategy as well as the config file does (the caller validates the config again)."""
    for cls in (FSDP, DeepSpeed):  # DeepSpeed's flag wins where a launcher sets both
        cls.adopt_launcher_env(cfg, os.environ)


def ensure_process_group_env() -> None:
    """DeepSpeed needs a process group even for one process started without a launcher."""
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1")


# ---------------------------------------------------------------------------------------------- strategies


class Strategy:
    """One value of parallel.strategy. Subclasses answer for theirs; adding a strategy is one subclass here and
    its entry in STRATEGIES."""

    name: ClassVar[str]
    shards_state: ClassVar[bool] = False
    """A rank's checkpoint files hold only its part: consolidated weights are written beside them."""
    any_world_size: ClassVar[bool] = True
    """Its checkpoints resume on any number of ranks."""
    own_precision: ClassVar[bool] = False
    """It applies autocast itself: the launcher and Accelerate are told `mixed_precision=no`."""
    cpu_flag: ClassVar[bool] = True
    """CPU launches may set ACCELERATE_USE_CPU (DeepSpeed turns itself off under it)."""
    always_grouped: ClassVar[bool] = False
    """It needs a process group even for one process started without a launcher."""
    refuses: ClassVar[dict[str, str]] = {}
    """train.* switches it cannot honour, with why: `on` is an error, `auto` means off."""
    save_kwargs: ClassVar[dict[str, Any]] = {}
    """Arguments of its own checkpoint writer (through Accelerate's save_state)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    @classmethod
    def validate(cls, cfg: RunConfig) -> None:
        """Config checks that need no imports; the DeepSpeed-only keys are errors elsewhere."""
        p = cfg.parallel
        for key in ("offload_optimizer", "offload_params", "deepspeed_config"):
            if getattr(p, key):
                raise ConfigError(f"parallel.{key} needs parallel.strategy=deepspeed (got {p.strategy})")
        cls.check_switches(cfg)

    @classmethod
    def check_switches(cls, cfg: RunConfig) -> None:
        for key, why in cls.refuses.items():
            if getattr(cfg.train, key) == "on":
                raise ConfigError(f"train.{key}=on is not supported with parallel.strategy={cls.name}: {why}; use "
                                  f"train.{key}=auto (off here) or another parallel.strategy")

    def allows(self, switch: str) -> bool:
        """Whether train.<switch> may be on under this strategy (auto is decided by the device)."""
        return switch not in self.refuses

    @classmethod
    def adopt_launcher_env(cls, cfg: RunConfig, env: Any) -> None:
        """Select this strategy in `cfg` when the launcher's environment asks for it."""

    @classmethod
    def double_backward_ok(cls, cfg: RunConfig) -> bool:
        """Whether a loss may differentiate through a gradient (R1)."""
        return True

    def preflight(self) -> None:
        """Checks that need the strategy's package, before any process is launched."""

    # -- the process group and Accelerate

    def _accelerator_kwargs(self, trained: list[str], cpu: bool) -> dict[str, Any]:
        return {"cpu": cpu}

    def make_accelerator(self, trained: list[str], log_with: str | None) -> Accelerator:
        """One Accelerator for the run. `trained` names the modules that get an optimizer."""
        from accelerate import Accelerator
        from accelerate.utils import GradScalerKwargs, InitProcessGroupKwargs

        cfg = self.cfg
        cpu = cfg.train.cpu or not torch.cuda.is_available()
        if self.always_grouped:
            ensure_process_group_env()
        grouped = int(os.environ.get("WORLD_SIZE", "1")) > 1 or self.always_grouped
        # Name the backend only for a real group (or a strategy that always makes one).
        pg = InitProcessGroupKwargs(backend=("gloo" if cpu else "nccl") if grouped else None,
                                    timeout=timedelta(minutes=cfg.parallel.timeout_minutes))
        kwargs = self._accelerator_kwargs(trained, cpu)
        precision = "no" if self.own_precision else cfg.train.mixed_precision
        handlers: list[Any] = [pg]
        if precision == "fp16" and not cfg.train.loss_scaling:
            handlers.append(GradScalerKwargs(enabled=False))
        acc = Accelerator(mixed_precision=precision, log_with=log_with, project_dir=str(cfg.out_dir),
                          step_scheduler_with_optimizer=False, kwargs_handlers=handlers, **kwargs)
        self._after_accelerator(acc, kwargs)
        return acc

    def _after_accelerator(self, acc: Accelerator, kwargs: dict[str, Any]) -> None:
        pass

    def autocast(self, acc: Accelerator) -> AbstractContextManager:
        """Mixed precision for a forward pass (train.mixed_precision)."""
        return nullcontext() if self.cfg.train.mixed_precision == "no" else acc.autocast()

    # -- modules

    def prepare(self, acc: Accelerator, modules: dict[str, nn.Module], opts: dict[str, Any],
                scheds: dict[str, Any]) -> dict[str, TrainedModule]:
        """Wrap every trained module (a key of `opts`) with its optimizer and schedule."""
        names = list(opts)
        n = len(names)
        prepared = acc.prepare(*[modules[k] for k in names], *opts.values(), *scheds.values())
        return {k: TrainedModule(acc, prepared[i], prepared[n + i], prepared[2 * n + i]) for i, k in enumerate(names)}

    def before_optimizers(self, acc: Accelerator, modules: dict[str, nn.Module]) -> None:
        """Change the trained modules' parameters where the strategy must before optimizers hold them."""

    def weight_layout(self, acc: Accelerator) -> WeightLayout:
        return Replicated()

    def end_step(self, modules: dict[str, nn.Module]) -> None:
        """After a step's phases: leave every trained module's weights in their stored layout."""

    def compile(self, trained: TrainedModule) -> None:
        """torch.compile in place (parameter names unchanged). A module made of repeated blocks gets each block
        compiled instead (`compile_blocks`). Otherwise the wrapper is compiled, so that under DDP dynamo splits
        the graph at the gradient buckets and their all-reduce still overlaps the backward."""
        if compile_blocks(trained):
            return
        wrapper = trained.wrapper
        wrapper.compile()
        trained.uncompiled = lambda: swapped(wrapper, "_compiled_call_impl", None)

    def numel(self, p: torch.Tensor) -> int:
        """Elements of the whole parameter `p`, however little of it this rank holds."""
        return p.numel()

    def sharding_units(self, module: nn.Module) -> list[str] | int:
        """The groups whose weights are gathered together: the FSDP units by name, or how many submodules ZeRO-3
        gathers one by one; 1 for a whole module."""
        return 1


class DDP(Strategy):
    """Every rank holds the whole modules and optimizer state; gradients are all-reduced."""

    name = "ddp"


class DeepSpeed(Strategy):
    """ZeRO 1/2/3: optimizer state, then gradients, then parameters partitioned over ranks; one engine per
    trained module."""

    name = "deepspeed"
    shards_state = True
    any_world_size = False
    own_precision = True
    cpu_flag = False
    always_grouped = True
    # A frozen pretrained base (under a LoRA) is rebuilt from its pipeline, not kept in every checkpoint.
    save_kwargs: ClassVar[dict[str, Any]] = {"exclude_frozen_parameters": True}
    refuses: ClassVar[dict[str, str]] = {
        "compile": "gen_dist does not compile DeepSpeed engines (ZeRO's parameter hooks and partitioned weights "
                   "are outside what it tests)",
        "channels_last": "ZeRO keeps parameters as views of flat buffers, whose memory format is contiguous",
    }

    @classmethod
    def validate(cls, cfg: RunConfig) -> None:
        cls.check_switches(cfg)
        p = cfg.parallel
        if p.offload_params and p.zero_stage != 3:
            raise ConfigError("parallel.offload_params needs parallel.zero_stage=3 (ZeRO 1/2 do not partition "
                              "parameters)")
        if cfg.train.mixed_precision == "fp16":
            raise ConfigError("train.mixed_precision=fp16 is not supported with parallel.strategy=deepspeed: "
                              "gen_dist runs DeepSpeed with fp32 master parameters under autocast, where ZeRO has no "
                              "loss scaling; use bf16, or fp16 with parallel.strategy=ddp or fsdp")

    @classmethod
    def adopt_launcher_env(cls, cfg: RunConfig, env: Any) -> None:
        if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
            return
        p = cfg.parallel
        p.strategy = cls.name
        config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        if config_file != "none":
            p.deepspeed_config = config_file
            p.zero_stage = read_json(config_file).get("zero_optimization", {}).get("stage", p.zero_stage)
        elif "ACCELERATE_DEEPSPEED_ZERO_STAGE" in env:
            p.zero_stage = int(env["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
        p.offload_optimizer |= env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") == "cpu"
        p.offload_params |= env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none") == "cpu"

    @classmethod
    def double_backward_ok(cls, cfg: RunConfig) -> bool:
        # ZeRO-3 frees the gathered weights after the first backward.
        return cfg.parallel.zero_stage != 3

    def preflight(self) -> None:
        check_deepspeed(self.cfg)

    def _accelerator_kwargs(self, trained: list[str], cpu: bool) -> dict[str, Any]:
        from accelerate.utils import DeepSpeedPlugin

        world = int(os.environ["WORLD_SIZE"])
        return {"deepspeed_plugins": {n: DeepSpeedPlugin(hf_ds_config=deepspeed_config(self.cfg, world))
                                      for n in trained}}

    def autocast(self, acc: Accelerator) -> AbstractContextManager:
        if self.cfg.train.mixed_precision == "no":
            return nullcontext()
        return torch.autocast(acc.device.type, dtype=torch.bfloat16)

    def prepare(self, acc: Accelerator, modules: dict[str, nn.Module], opts: dict[str, Any],
                scheds: dict[str, Any]) -> dict[str, TrainedModule]:
        out: dict[str, TrainedModule] = {}
        for name in opts:  # one prepare() per module: one engine each, from the module's own plugin
            acc.state.select_deepspeed_plugin(name)
            wrapper, opt, sched = acc.prepare(modules[name], opts[name], scheds[name])
            out[name] = DeepSpeedTrainedModule(acc, wrapper, opt, sched)
        return out

    def weight_layout(self, acc: Accelerator) -> WeightLayout:
        return Zero3Partitions(acc.device) if self.cfg.parallel.zero_stage == 3 else Replicated()

    def numel(self, p: torch.Tensor) -> int:
        return getattr(p, "ds_numel", p.numel())

    def sharding_units(self, module: nn.Module) -> list[str] | int:
        """ZeRO-3 gathers each submodule's own parameters when its forward runs."""
        if self.cfg.parallel.zero_stage != 3:
            return 1
        return sum(1 for m in module.modules() if next(m.parameters(recurse=False), None) is not None)


class FSDP(Strategy):
    """FSDP2 (`fully_shard` per trained module) through Accelerate, fp32 parameters and reductions."""

    name = "fsdp"
    shards_state = True
    always_grouped = True
    refuses: ClassVar[dict[str, str]] = {
        "channels_last": "FSDP2 shards each parameter on dim 0 and gathers it into contiguous buffers"}

    @classmethod
    def adopt_launcher_env(cls, cfg: RunConfig, env: Any) -> None:
        if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            cfg.parallel.strategy = cls.name

    def _accelerator_kwargs(self, trained: list[str], cpu: bool) -> dict[str, Any]:
        from accelerate import FullyShardedDataParallelPlugin
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # fp32 parameters and reductions; train.mixed_precision is autocast, as under the other strategies.
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, reshard_after_forward=True,
            mixed_precision_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32))
        return {"cpu": cpu, "fsdp_plugin": plugin}

    def _after_accelerator(self, acc: Accelerator, kwargs: dict[str, Any]) -> None:
        """Accelerate picks FSDP only for accelerator devices and otherwise falls back to DDP without a word;
        FSDP2 itself runs on CPU with gloo. Both state objects must say FSDP or the next prepare() resets it."""
        if acc.device.type != "cpu":
            return
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        acc.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        acc.state.fsdp_plugin = kwargs["fsdp_plugin"]

    def prepare(self, acc: Accelerator, modules: dict[str, nn.Module], opts: dict[str, Any],
                scheds: dict[str, Any]) -> dict[str, TrainedModule]:
        out: dict[str, TrainedModule] = {}
        for name in opts:  # one prepare() per module: one FSDP root each
            wrapper, opt, sched = acc.prepare(modules[name], opts[name], scheds[name])
            out[name] = FSDPTrainedModule(acc, wrapper, opt, sched)
        return out

    def before_optimizers(self, acc: Accelerator, modules: dict[str, nn.Module]) -> None:
        """Each repeated block its own unit, before the optimizers take the parameters (then the root's
        prepare() holds the rest)."""
        from torch.distributed.fsdp import fully_shard

        for module in modules.values():
            for unit in shard_units(module):
                fully_shard(unit, reshard_after_forward=True, mp_policy=acc.state.fsdp_plugin.mixed_precision_policy)

    def weight_layout(self, acc: Accelerator) -> WeightLayout:
        return FSDP2Shards()

    def sharding_units(self, module: nn.Module) -> list[str] | int:
        from torch.distributed.fsdp import FSDPModule

        return [n or "(root)" for n, m in module.named_modules() if isinstance(m, FSDPModule)]

    def end_step(self, modules: dict[str, nn.Module]) -> None:
        """FSDP2 keeps a root module's gathered weights after its forward for the backward that follows; a
        module used only without gradients in the step (a first pass under no_grad) still holds them."""
        for m in modules.values():
            m.reshard()

    def compile(self, trained: TrainedModule) -> None:
        """Only the module's (or each block's) own forward: FSDP2's all-gather and reshard hooks around it stay
        eager."""
        if compile_blocks(trained):
            return
        module, forward = trained.module, trained.module.forward
        module.forward = torch.compile(forward)
        trained.uncompiled = lambda: swapped(module, "forward", forward)


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (DDP, DeepSpeed, FSDP)}


def strategy_for(cfg: RunConfig) -> Strategy:
    return STRATEGIES[cfg.parallel.strategy](cfg)
