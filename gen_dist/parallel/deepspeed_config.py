"""The DeepSpeed config of one engine: tuning from parallel.deepspeed_config, the rest from the run config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gen_dist.schema import ConfigError, RunConfig

# DeepSpeed settings that gen_dist owns; a DeepSpeed JSON may not set them.
OWNED = ("optimizer", "scheduler")


def read_json(path: str) -> dict[str, Any]:
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
    base = read_json(p.deepspeed_config) if p.deepspeed_config else {}
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
