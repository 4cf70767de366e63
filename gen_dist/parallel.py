"""How trained modules are spread over ranks and stepped: DDP, DeepSpeed ZeRO 1/2/3 or FSDP2.

`parallel.strategy` selects one `Strategy` (STRATEGIES); it answers every question whose answer depends on the
strategy: the checks of its settings, the launcher and Accelerator settings, autocast, how modules are wrapped,
where a rank's part of a weight lives and what a checkpoint holds. The engine holds one `TrainedModule` per
trained module and an `EMA`; neither the loop nor the tasks know which strategy runs. DeepSpeed gets one engine
per trained module (a GAN has two), each from its own plugin of the same Accelerator. Under every strategy the
parameters stay fp32 and mixed precision is autocast, so the numerics of a ZeRO or FSDP run match DDP's."""

from __future__ import annotations

import json
import os
import types
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as torch_dist
from torch import nn

from gen_dist.config import ConfigError, RunConfig, validate

if TYPE_CHECKING:  # Accelerate is imported where it is used: the launcher's checks do not pay for it
    from accelerate import Accelerator


class NonFiniteError(RuntimeError):
    """Training cannot go on: non-finite losses or gradients that could not be skipped."""


# DeepSpeed settings that gen_dist owns; a DeepSpeed JSON may not set them.
OWNED = ("optimizer", "scheduler")


def adopt_launcher_strategy(cfg: RunConfig) -> None:
    """`accelerate launch --use_deepspeed ...` / `--use_fsdp` (or an accelerate config saying so) selects the
    strategy as well as the config file does."""
    for cls in (FSDP, DeepSpeed):  # DeepSpeed's flag wins where a launcher sets both
        cls.adopt_launcher_env(cfg, os.environ)
    validate(cfg)


# ---------------------------------------------------------------------------------------------- DeepSpeed


def _read_json(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"parallel.deepspeed_config {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"parallel.deepspeed_config {path} must hold a JSON object")
    return data


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of one engine: tuning from parallel.deepspeed_config, the rest from `cfg`."""
    p = cfg.parallel
    base = _read_json(p.deepspeed_config) if p.deepspeed_config else {}
    for key in OWNED:
        if key in base:
            raise ConfigError(f"{p.deepspeed_config} sets '{key}': gen_dist builds AdamW and the LR schedule "
                              f"from the optim section; remove it from the DeepSpeed config")
    for key in ("fp16", "bf16"):
        if str(base.get(key, {}).get("enabled", False)).lower() == "true":
            raise ConfigError(f"{p.deepspeed_config} enables {key}: precision comes from train.mixed_precision "
                              f"(autocast over fp32 parameters); set it to \"auto\" or false")
    zero = {k: v for k, v in base.get("zero_optimization", {}).items() if v != "auto"}
    if zero.get("stage", p.zero_stage) != p.zero_stage:
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} but {p.deepspeed_config} says stage "
                          f"{zero['stage']}; make them agree")
    zero["stage"] = p.zero_stage
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    micro = cfg.data.batch_size
    return {
        **{k: v for k, v in base.items() if v != "auto" and k not in ("zero_optimization", "fp16", "bf16")},
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": micro * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": base.get("steps_per_print", 10**9),
        "wall_clock_breakdown": False,
    }


def check_deepspeed(cfg: RunConfig) -> None:
    """Validate the DeepSpeed side of `cfg` offline, before any process is launched."""
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError as e:
        raise ConfigError(f"parallel.strategy=deepspeed needs the deepspeed package ({e})") from None
    ds = deepspeed_config(cfg, world_size=1)
    try:
        DeepSpeedZeroConfig(**ds["zero_optimization"])
    except Exception as e:  # pydantic's ValidationError names the bad key
        raise ConfigError(f"invalid DeepSpeed zero_optimization settings: {e}") from None


def _ensure_process_group_env() -> None:
    """DeepSpeed needs a process group even for one process started without a launcher."""
    from gen_dist.launch import free_port

    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1")


# ---------------------------------------------------------------------------------------------- stepping


@contextmanager
def _swapped(obj: Any, attr: str, value: Any) -> Iterator[None]:
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


class TrainedModule:
    """A trained module with its optimizer and LR schedule, as the strategy wraps it: `wrapper` is what the
    loss calls (DDP, an FSDP root, a DeepSpeed engine), `module` the plain module inside."""

    def __init__(self, acc: Accelerator, wrapper: nn.Module, opt: Any, sched: Any) -> None:
        self.acc, self.wrapper, self.opt, self.sched = acc, wrapper, opt, sched
        self.uncompiled: Callable[[], AbstractContextManager] = nullcontext
        """Runs the module eagerly within it (set by Strategy.compile)."""
        # keep_fp32_wrapper=False drops the autocast that prepare() patches into forward: autocast is applied
        # per phase instead, so that an fp32 regulariser can opt out.
        self.module: nn.Module = acc.unwrap_model(wrapper, keep_fp32_wrapper=False)

    def sync(self, last: bool) -> AbstractContextManager:
        """Gradient all-reduce only on the last micro-batch of an accumulation."""
        return nullcontext() if last else self.acc.no_sync(self.wrapper)

    def backward(self, loss: torch.Tensor, n_micro: int) -> None:
        self.acc.backward(loss / n_micro)

    def double_backward(self) -> AbstractContextManager:
        """Around a phase that differentiates through a gradient (R1). It runs eagerly: AOTAutograd refuses the
        double backward of many compiled graphs."""
        return self.uncompiled()

    def step(self, clip: float) -> tuple[torch.Tensor, bool]:
        """Clip, step, zero; returns the gradient norm before clipping and whether the optimizer stepped.

        The norm is of the reduced gradients, so a non-finite loss or gradient on any rank makes it non-finite
        on every rank: all ranks skip the same step without another collective."""
        norm = self.acc.clip_grad_norm_(self.wrapper.parameters(), clip or float("inf")).detach().float()
        finite = bool(torch.isfinite(norm))
        if finite or (self.acc.scaler is not None and self.acc.scaler.is_enabled()):
            self.opt.step()  # under fp16 loss scaling the scaler skips a non-finite step and lowers its scale
        self.opt.zero_grad(set_to_none=True)
        return norm, finite


class DeepSpeedTrainedModule(TrainedModule):
    """A DeepSpeed engine: it reduces, clips and steps by itself at the accumulation boundary."""

    skipped = False

    def sync(self, last: bool) -> AbstractContextManager:
        return nullcontext()

    def backward(self, loss: torch.Tensor, n_micro: int) -> None:
        # The engine steps inside its own step() and cannot take a step back, so a non-finite loss on any rank
        # is caught before backward (one all-reduce of a flag) and all ranks skip the phase together.
        bad = torch.tensor(0.0 if bool(torch.isfinite(loss)) else 1.0, device=loss.device)
        if self.acc.num_processes > 1:
            torch_dist.all_reduce(bad, op=torch_dist.ReduceOp.MAX)
        if bad.item() or self.skipped:
            if n_micro > 1:
                raise NonFiniteError("non-finite loss during gradient accumulation under DeepSpeed, whose engine "
                                     "cannot drop the micro-batches it has taken; resume from the last checkpoint")
            self.skipped = True
            return
        self.wrapper.backward(loss)  # scaled by 1/gradient_accumulation_steps inside
        self.wrapper.step()  # a no-op until the last micro-batch

    def step(self, clip: float) -> tuple[torch.Tensor, bool]:
        if self.skipped:
            self.skipped = False
            return torch.tensor(float("nan")), False
        norm = torch.as_tensor(self.wrapper.get_global_grad_norm() or 0.0, dtype=torch.float32).detach()
        if not bool(torch.isfinite(norm)):
            raise NonFiniteError("non-finite gradient norm under DeepSpeed after the engine stepped (the weights "
                                 "are no longer usable); resume from the last checkpoint")
        return norm, True


class FSDPTrainedModule(TrainedModule):
    @contextmanager
    def double_backward(self) -> Iterator[None]:
        # FSDP2 frees the unsharded weights after the first backward; the second needs them again.
        from torch.distributed.fsdp import FSDPModule

        shards = [m for m in self.wrapper.modules() if isinstance(m, FSDPModule)]
        for m in shards:
            m.set_reshard_after_backward(False)
        try:
            with self.uncompiled():
                yield
        finally:
            for m in shards:
                m.reshard()
                m.set_reshard_after_backward(True)


# ---------------------------------------------------------------------------------------------- weight layouts


class Replicated:
    """Every rank holds whole parameters (DDP, ZeRO 1/2)."""

    def local(self, p: torch.Tensor) -> torch.Tensor:
        return p

    def gather(self, params: list[torch.Tensor], parts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.detach().clone() for t in parts]

    def scatter(self, params: list[torch.Tensor], full: list[torch.Tensor]) -> list[torch.Tensor]:
        return full


class Zero3Partitions:
    """ZeRO-3: each rank holds a flat, end-padded 1/world slice of every parameter (`p.ds_tensor`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rank, self.world = torch_dist.get_rank(), torch_dist.get_world_size()

    def local(self, p: torch.Tensor) -> torch.Tensor:
        return p.ds_tensor

    def gather(self, params: list[torch.Tensor], parts: list[torch.Tensor]) -> list[torch.Tensor]:
        sizes = [t.numel() for t in parts]
        flat = torch.cat([t.detach().reshape(-1).float() for t in parts]).to(self.device)
        out = [torch.empty_like(flat) for _ in range(self.world)]
        torch_dist.all_gather(out, flat)  # one collective for the whole module
        pieces = [o.split(sizes) for o in out]
        return [torch.cat([r[i] for r in pieces])[: p.ds_numel].view(p.ds_shape).cpu()
                for i, p in enumerate(params)]

    def scatter(self, params: list[torch.Tensor], full: list[torch.Tensor]) -> list[torch.Tensor]:
        parts = []
        for p, f in zip(params, full, strict=True):
            n = p.ds_tensor.numel()
            part = torch.zeros(n, dtype=torch.float32)
            piece = f.reshape(-1)[self.rank * n : (self.rank + 1) * n]
            part[: piece.numel()] = piece
            parts.append(part)
        return parts


class FSDP2Shards:
    """FSDP2: parameters are DTensors sharded on dim 0; this rank's shard is `to_local()`."""

    def local(self, p: torch.Tensor) -> torch.Tensor:
        return p.to_local()

    def gather(self, params: list[torch.Tensor], parts: list[torch.Tensor]) -> list[torch.Tensor]:
        from torch.distributed.tensor import DTensor

        return [DTensor.from_local(t.detach().to(p.dtype), p.device_mesh, p.placements, shape=p.shape,
                                   stride=p.stride()).full_tensor().cpu() for p, t in zip(params, parts, strict=True)]

    def scatter(self, params: list[torch.Tensor], full: list[torch.Tensor]) -> list[torch.Tensor]:
        from torch.distributed.tensor import distribute_tensor

        return [distribute_tensor(f.to(p.device, p.dtype), p.device_mesh, p.placements).to_local()
                for p, f in zip(params, full, strict=True)]


WeightLayout = Replicated | Zero3Partitions | FSDP2Shards
"""Where a rank's part of each weight lives, and how the whole weights are gathered from the parts."""


def saved_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a state dict holds (not the non-persistent ones, which the module computes itself, such as
    a DiT's position embedding)."""
    return {f"{prefix}.{name}".lstrip("."): b for prefix, m in module.named_modules() for name, b in m._buffers.items()
            if b is not None and name not in m._non_persistent_buffers_set}


def full_state_dict(module: nn.Module, layout: WeightLayout) -> dict[str, torch.Tensor]:
    """Whole fp32 weights and buffers of `module` on every rank (a collective under sharding)."""
    names, params = zip(*module.named_parameters(), strict=True)
    full = layout.gather(list(params), [layout.local(p) for p in params])
    out = {n: t.detach().float().cpu() for n, t in zip(names, full, strict=True)}
    out.update({n: b.detach().cpu().clone() for n, b in saved_buffers(module).items()})
    return out


def warmed_decay(decay: float) -> Callable[[int], float]:
    """train.ema_decay with warm-up, min(decay, (1 + n) / (10 + n)) after n updates: early averages are not
    dominated by the initial weights."""
    return lambda n: min(decay, (1 + n) / (10 + n))


class EMA:
    """Exponential moving average of a module's parameters, held in fp32 in the layout the strategy stores them
    in (this rank's partition under ZeRO-3 and FSDP), so it costs no more memory per rank than the weights. `beta`
    gives the decay of the update after n earlier ones."""

    def __init__(self, module: nn.Module, beta: Callable[[int], float], layout: WeightLayout) -> None:
        self.module, self.beta, self.layout = module, beta, layout
        self.names = [n for n, _ in module.named_parameters()]
        self.params = [p for _, p in module.named_parameters()]
        self.shadow = [layout.local(p).detach().float().clone() for p in self.params]
        self.buffers = {n: b.detach().clone() for n, b in saved_buffers(module).items()}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        d = self.beta(self.updates)
        torch._foreach_lerp_(self.shadow, [self.layout.local(p).float() for p in self.params], 1 - d)
        for n, b in saved_buffers(self.module).items():
            self.buffers[n].copy_(b)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Consolidated EMA weights, keyed like the module's own state dict (a collective under sharding)."""
        full = self.layout.gather(self.params, self.shadow)
        out = {n: t.cpu() for n, t in zip(self.names, full, strict=True)}
        out.update({n: b.cpu().clone() for n, b in self.buffers.items()})
        return out

    def meta_state(self) -> dict[str, int]:
        """What a checkpoint's meta file keeps of the EMA (its weights go to their own file)."""
        return {"updates": self.updates}

    def load(self, weights_file: Path, meta_state: dict[str, int]) -> None:
        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(weights_file)), meta_state["updates"])

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        missing = [n for n in [*self.names, *self.buffers] if n not in state]
        if missing:
            raise ValueError(f"EMA state lacks {missing[:5]}")
        parts = self.layout.scatter(self.params, [state[n] for n in self.names])
        for s, part in zip(self.shadow, parts, strict=True):
            s.copy_(part.to(s.device))
        for n, b in self.buffers.items():
            b.copy_(state[n].to(b.device))
        self.updates = updates


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
            _ensure_process_group_env()
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
        trained.uncompiled = lambda: _swapped(wrapper, "_compiled_call_impl", None)

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
            p.zero_stage = _read_json(config_file).get("zero_optimization", {}).get("stage", p.zero_stage)
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
        trained.uncompiled = lambda: _swapped(module, "forward", forward)


def blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a module that names their class in `_no_split_modules` (as transformers do)."""
    names = set(getattr(module, "_no_split_modules", None) or ())
    return [m for m in module.modules() if names & {c.__name__ for c in type(m).__mro__}]


def shard_units(module: nn.Module) -> list[nn.Module]:
    """FSDP units below a module's root: its repeated blocks, each gathered only while it runs, except those the
    module also uses outside their own forward (`_root_blocks`; diffusers' DiT reads its first block's
    conditioning embedding for its output layer), which stay in the root's unit."""
    keep = {id(m) for m in getattr(module, "_root_blocks", ())}
    return [b for b in blocks(module) if id(b) not in keep]


def compile_block_forwards(module: nn.Module) -> list[tuple[nn.Module, Callable, Callable]]:
    """Each repeated block's forward replaced by one compiled function per block class, bound to the block: the
    block is an argument of the graph, not a constant of it, so every block reuses the graph (compiling each
    bound forward would recompile per block). Returns (block, plain forward, compiled forward)."""
    found = blocks(module)
    shared = {cls: torch.compile(cls.forward) for cls in {type(b) for b in found}}
    forwards = [(b, b.forward, types.MethodType(shared[type(b)], b)) for b in found]
    for b, _, compiled in forwards:
        b.forward = compiled
    return forwards


def compile_blocks(trained: TrainedModule) -> bool:
    """Regional compilation: each repeated block's forward is compiled, the rest of the module stays eager. The
    blocks share one graph (their parameters are its inputs), so compile time does not grow with depth, and
    FSDP's per-block hooks stay outside it. False for a module without repeated blocks."""
    forwards = compile_block_forwards(trained.module)
    if not forwards:
        return False

    @contextmanager
    def eager() -> Iterator[None]:
        for b, plain, _ in forwards:
            b.forward = plain
        try:
            yield
        finally:
            for b, _, compiled in forwards:
                b.forward = compiled

    trained.uncompiled = eager
    return True


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (DDP, DeepSpeed, FSDP)}


def strategy_for(cfg: RunConfig) -> Strategy:
    return STRATEGIES[cfg.parallel.strategy](cfg)
