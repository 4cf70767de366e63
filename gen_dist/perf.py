"""The fast path and what a user watches of it: device settings (TF32, cuDNN autotuning, channels-last, fused
optimizers), model FLOPs per image and MFU, peak memory, and the breakdown of a step's time."""

from __future__ import annotations

import resource
import time
from collections.abc import Mapping
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from gen_dist.parallel import set_trainable

if TYPE_CHECKING:
    from gen_dist.family import Task
    from gen_dist.schema import RunConfig

# Dense peak TFLOP/s per device (vendor data sheets, no sparsity): tensor-core half precision (bf16/fp16),
# TF32, and plain fp32. Looked up by substring of torch.cuda.get_device_name, first match wins.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("B200", {"half": 2250.0, "tf32": 1100.0, "fp32": 75.0}),
    ("H200", {"half": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("H100 PCIe", {"half": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100 NVL", {"half": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H100", {"half": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("A100", {"half": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"half": 362.0, "tf32": 183.0, "fp32": 91.6}),
    ("RTX 4090", {"half": 165.2, "tf32": 82.6, "fp32": 82.6}),
    ("A10", {"half": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("L4", {"half": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("V100", {"half": 125.0, "fp32": 15.7}),
)


def switch_on(value: str, device: torch.device) -> bool:
    """A train.* switch resolved for `device`: auto means on for CUDA devices."""
    return value == "on" or (value == "auto" and device.type == "cuda")


NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags (Linux /proc/cpuinfo) of a native bf16 dot product; without them CPU autocast to bf16 emulates it
and runs several times slower than fp32."""


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def choose_precision(cfg: RunConfig) -> dict[str, str]:
    """train.mixed_precision as this process will train: `auto` becomes bf16 where the device computes bf16
    natively, else no. Returns what was asked, what was chosen and why."""
    asked = cfg.train.mixed_precision
    if asked != "auto":
        return {"asked": asked, "chose": asked, "why": "set in the config"}
    if torch.cuda.is_available() and not cfg.train.cpu:
        if torch.cuda.is_bf16_supported():
            return {"asked": asked, "chose": "bf16", "why": f"{torch.cuda.get_device_name()} computes bf16 natively"}
        return {"asked": asked, "chose": "no", "why": f"{torch.cuda.get_device_name()} has no native bf16"}
    native = sorted(set(NATIVE_BF16_CPU_FLAGS) & cpu_flags())
    if native:
        return {"asked": asked, "chose": "bf16", "why": f"the CPU has {' and '.join(native)}"}
    return {"asked": asked, "chose": "no", "why": f"the CPU has none of {', '.join(NATIVE_BF16_CPU_FLAGS)}: bf16 "
                                                  f"would be emulated, slower than fp32"}


def configure_device(cfg: RunConfig, device: torch.device) -> None:
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    torch.backends.cudnn.benchmark = True  # shapes are fixed: each convolution's fastest kernel is found once


def optimizer_kwargs(cfg: RunConfig, device: torch.device) -> dict[str, bool]:
    """One fused kernel per step on CUDA; multi-tensor (foreach) updates otherwise (torch's CPU default is a
    loop over the parameters)."""
    if device.type == "cuda" and not cfg.parallel.offload_optimizer:
        return {"fused": True}
    return {"foreach": True}


def before_compile(shapes: int = 1) -> None:
    """Random draws inside compiled code are the eager ones (inductor's own generator would draw others), so a
    run trains the same with train.compile on and off, and a resume across the switch stays exact. With
    `shapes` image shapes (aspect-ratio buckets) each compiled block keeps one graph per shape, instead of
    falling back to eager at dynamo's default limit of 8."""
    import torch._dynamo.config
    import torch._inductor.config

    torch._inductor.config.fallback_random = True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * shapes)


def to_channels_last(module: nn.Module) -> nn.Module:
    return module.to(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------- FLOPs and MFU


SHAPES_ONLY_ABOVE = 100_000_000
"""Trained parameters above which the FLOP count runs on fake tensors."""


def flops_per_image(task: Task, frozen: Mapping[str, nn.Module], shape: tuple[int, int, int]) -> float:
    """Model FLOPs of one training image in one step: every phase's forward and backward (weighted by how often
    it runs), counted with torch's FLOP counter on a small CPU batch of the task's own modules. Attention is
    counted in its math form (the fused CPU kernel has no FLOP formula). RNG, buffers and gradients are left as
    they were, so the run is the same with or without the count."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n = 4
    batch = {"x": torch.zeros(n, *shape), "label": torch.zeros(n, dtype=torch.long), "key": [""] * n}
    # A pretrained model's count would cost minutes and tens of GB per rank on the CPU: its ops are then run on
    # fake tensors, which carry shapes (all the FLOP formulas read) and compute nothing.
    big = sum(p.numel() for m in task.modules.values() for p in m.parameters()) > SHAPES_ONLY_ABOVE
    nets = {**task.modules, **frozen}
    buffers = {(name, b): b.clone() for name, m in nets.items() for b in m.buffers()}
    rng = torch.random.get_rng_state()
    total = 0.0
    try:
        for phase in task.phases:
            for name, m in task.modules.items():
                set_trainable(m, name == phase.trains)
            counter = _FlopCounter()
            with counter, sdpa_kernel(SDPBackend.MATH), FakeTensorMode(allow_non_fake_inputs=True) if big \
                    else nullcontext():
                loss, _ = phase.loss(nets, batch, 0)
                loss.backward()
            total += counter.total / phase.every
    finally:
        torch.random.set_rng_state(rng)
        for m in task.modules.values():
            set_trainable(m, True)
            m.zero_grad(set_to_none=True)
        for (_, b), saved in buffers.items():
            b.copy_(saved)
    return total / n


class _FlopCounter(TorchDispatchMode):
    """Sums the FLOPs of every op that torch's FLOP counter has a formula for. FlopCounterMode itself also
    tracks modules with backward hooks, which a loss that calls autograd.grad (R1) cannot run under."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **(kwargs or {}), out_val=out)
        return out


def peak_tflops(cfg: RunConfig, device: torch.device) -> tuple[float | None, str]:
    """The device's dense peak TFLOP/s at the run's precision, and the device's name; None when unknown."""
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    if cfg.train.mixed_precision != "no":
        kind = "half"
    else:
        tf32 = cfg.train.tf32 and torch.cuda.get_device_capability(device)[0] >= 8
        kind = "tf32" if tf32 else "fp32"
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks.get(kind), name
    return None, name


# ---------------------------------------------------------------------------------------------- memory and time


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory of this rank since the last call: allocated and reserved device memory on CUDA (then reset);
    on CPU the process's peak resident set (it never goes down)."""
    if device.type == "cuda":
        out = {"memory/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
               "memory/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
        torch.cuda.reset_peak_memory_stats(device)
        return out
    return {"memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class StepClock:
    """Time of each part of the steps of a logging window. On CUDA the parts are bounded by events recorded on
    the current stream, so nothing waits inside a step and each part is the device time it took (the data part
    is the device standing idle for the next batch); on CPU by the host clock."""

    PARTS = ("data", "fwd_bwd", "optimizer", "collectives", "ema")

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[str, Any, Any]] = []
        self.last: Any = None

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.last = self._now()

    def mark(self, part: str) -> None:
        """The time since the last mark (or start) was spent on `part`."""
        now = self._now()
        if self.last is not None:  # a step run outside the loop (no start) is not timed
            self.spans.append((part, self.last, now))
        self.last = now

    def take(self, steps: int) -> dict[str, float]:
        """Milliseconds per step of each part since the last take."""
        totals = dict.fromkeys(self.PARTS, 0.0)
        if self.cuda and self.spans:
            self.spans[-1][2].synchronize()
        for part, a, b in self.spans:
            totals[part] += a.elapsed_time(b) if self.cuda else 1000 * (b - a)
        self.spans = []
        return {f"time/{p}_ms": v / max(1, steps) for p, v in totals.items()}
