"""Sampling and export from checkpoints, without a process group: everything here reads consolidated files."""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gen_dist import checkpoint
from gen_dist.config import ConfigError, RunConfig, config_from_yaml, get_value
from gen_dist.evaluation import sample_chunk
from gen_dist.images import save_images, to_hwc
from gen_dist.tasks import Task, families, family


def resolve(path: Path) -> checkpoint.Description:
    """A checkpoint directory, or the latest checkpoint of a run directory."""
    if (path / checkpoint.META).is_file():
        return checkpoint.describe(path)
    found = checkpoint.latest_verified(path)
    if found is None:
        raise ConfigError(f"{path} is neither a checkpoint nor a run directory with checkpoints")
    return found


def module_weights(ckpt: checkpoint.Description, name: str, use_ema: bool) -> dict[str, torch.Tensor]:
    """Consolidated weights of module `name` (its EMA when asked and kept) from a checkpoint."""
    if use_ema and ckpt.ema_file is not None:
        return load_file(str(ckpt.ema_file))
    return load_file(str(ckpt.weights_file or ckpt.module_file(name)))


def run_config_file(ckpt: checkpoint.Description) -> Path:
    """The config file of the run a checkpoint belongs to."""
    return ckpt.path.parent.parent / "config.yaml"


def export(path: Path, out: Path) -> Path:
    """One safetensors file with the sampled module's raw (`model.*`) and EMA (`ema.*`) weights, the frozen
    modules sampling needs (`frozen.NAME.*`, e.g. a latent model's first stage, with their own configs), and the
    run config and task state in its metadata; `gen-dist sample` reads it without the run directory."""
    ckpt = resolve(path)
    source = run_config_file(ckpt)
    text = source.read_text()
    # As sampling would load it: without training-only parts (a perceptual network) whose files may be gone.
    cfg = config_for_sampling(text, str(source), [])
    task = family(cfg.task).task(cfg)
    name = task.sampled
    tensors = {f"model.{k}": v for k, v in module_weights(ckpt, name, use_ema=False).items()}
    if ckpt.ema_file is not None:
        tensors.update({f"ema.{k}": v for k, v in load_file(str(ckpt.ema_file)).items()})
    configs = {}
    for frozen, key in task.frozen_from.items():
        tensors.update({f"frozen.{frozen}.{k}": v for k, v in task.frozen[frozen].state_dict().items()})
        configs[frozen] = source_config_text(Path(str(get_value(cfg, key))))
    write_weights_file(out, {"": tensors}, text, ckpt.step, name, ckpt.state.get("task", {}), dict(task.frozen_from),
                       configs)
    return out


def write_weights_file(out: Path, groups: dict[str, dict[str, torch.Tensor]], config: str, step: int, module: str,
                       task_state: dict, frozen_from: dict[str, str] | None = None,
                       frozen_configs: dict[str, str] | None = None) -> None:
    """The file of `gen-dist export` and of training snapshots: tensors under their group prefix (model., ema.,
    frozen.NAME.), the run config and what sampling needs in the metadata. Written whole, then renamed."""
    tensors = {f"{prefix}{k}": v.detach().cpu().contiguous() for prefix, group in groups.items()
               for k, v in group.items()}
    meta = {"config": config, "step": str(step), "module": module, "task_state": json.dumps(task_state),
            "frozen_from": json.dumps(frozen_from or {}), "frozen_configs": json.dumps(frozen_configs or {})}
    save_atomic(out, tensors, meta)


def save_atomic(out: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """A safetensors file written whole under another name, then renamed: a reader never sees half of one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out)


def export_metadata(path: Path) -> dict[str, str]:
    """The metadata of a gen-dist export; ConfigError for any other file."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for files that are not safetensors
        raise ConfigError(f"{path} is not a safetensors file: {e}") from None
    if "config" not in meta:
        raise ConfigError(f"{path} is not a gen-dist export (no config in its metadata)")
    return meta


def source_config_text(path: Path) -> str:
    """The YAML config of the run behind a run directory, a checkpoint or an export."""
    if path.is_file():
        return export_metadata(path)["config"]
    return run_config_file(resolve(path)).read_text()


def config_for_sampling(text: str, source: str, overrides: list[str]) -> RunConfig:
    """The config to sample with: the family's `for_sampling` overrides (which drop what only training needs),
    then the caller's."""
    try:
        task = (yaml.safe_load(text) or {}).get("task", RunConfig.task)
    except yaml.YAMLError:
        task = RunConfig.task  # config_from_yaml names the error
    known = family(task).task.for_sampling if task in families() else ()
    return config_from_yaml(text, source, [*known, *overrides])


def _load_export(path: Path, use_ema: bool, overrides: list[str]) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    meta = export_metadata(path)
    tensors = load_file(str(path))
    prefix = "ema." if use_ema and any(k.startswith("ema.") for k in tensors) else "model."
    weights = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    # Frozen modules the file carries come from it, whatever path the run's config named (a snapshot carries
    # none: the run's own first stage is used).
    carried = json.loads(meta.get("frozen_configs", "{}"))
    own = [f"{key}={path}" for name, key in json.loads(meta.get("frozen_from", "{}")).items() if name in carried]
    return config_for_sampling(meta["config"], f"metadata of {path}", [*own, *overrides]), weights


def load_weights(path: Path, use_ema: bool, overrides: list[str] = ()) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """The run config (with `overrides`) and the sampled module's weights of a checkpoint directory, a run
    directory or an exported .safetensors file."""
    if path.is_file():
        return _load_export(path, use_ema, list(overrides))
    ckpt = resolve(path)
    source = run_config_file(ckpt)
    cfg = config_for_sampling(source.read_text(), str(source), list(overrides))
    return cfg, module_weights(ckpt, family(cfg.task).task.sampled, use_ema)


def task_state(path: Path) -> dict:
    """The task state (Task.state_dict) saved with a checkpoint, a run's latest checkpoint or an export."""
    if path.is_file():
        return json.loads(export_metadata(path).get("task_state", "{}"))
    return resolve(path).state.get("task", {})


def load_frozen(path: Path, name: str) -> tuple[RunConfig, dict[str, torch.Tensor]] | None:
    """Frozen module `name` stored in an export (its own run config and weights), or None when `path` is not an
    export holding it."""
    if not path.is_file():
        return None
    configs = json.loads(export_metadata(path).get("frozen_configs", "{}"))
    if name not in configs:
        return None
    prefix = f"frozen.{name}."
    weights = {k.removeprefix(prefix): v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    return config_for_sampling(configs[name], f"{name} config in the metadata of {path}", []), weights


def check_init_source(path: Path) -> checkpoint.Description | None:
    """train.init_from names an existing export (None) or a checkpoint or run directory (its checkpoint's
    description); ConfigError otherwise. Reads metadata only."""
    if not path.exists():
        raise ConfigError(f"train.init_from: {path} does not exist")
    if path.is_dir():
        return resolve(path)
    export_metadata(path)
    return None


def init_weights(path: Path, sampled: str) -> dict[str, dict[str, torch.Tensor]]:
    """train.init_from: the weights per module of a run directory, a checkpoint or an export (the `sampled`
    module's EMA where kept). Modules whose consolidated weights a sharded checkpoint lacks are left out."""
    ckpt = check_init_source(path)
    if ckpt is None:
        return {export_metadata(path).get("module", sampled): _load_export(path, True, [])[1]}
    found = {}
    for name in ckpt.modules:
        if name == sampled and (ckpt.ema_file or ckpt.weights_file):
            found[name] = module_weights(ckpt, name, use_ema=True)
        elif ckpt.module_file(name).is_file():
            found[name] = load_file(str(ckpt.module_file(name)))
    return found


def load_partial(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Load the tensors of `weights` whose names and shapes match `module`'s; what was not loaded, by why."""
    own = module.state_dict()
    fits = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    module.load_state_dict(fits, strict=False)
    return {"loaded": sorted(fits), "missing": sorted(set(own) - set(weights)),
            "unexpected": sorted(set(weights) - set(own)),
            "shape_mismatch": sorted(k for k in weights if k in own and own[k].shape != weights[k].shape)}


def load_model(path: Path, use_ema: bool, device: torch.device, overrides: list[str] = ()
               ) -> tuple[RunConfig, Task, torch.nn.Module]:
    """The task and its sampled module, loaded and in eval mode on `device`."""
    cfg, weights = load_weights(path, use_ema, overrides)
    task = family(cfg.task).task(cfg)
    if not task.generates:
        raise ConfigError(f"{path} is a {cfg.task} run: it generates no images")
    task.load_state_dict(task_state(path))
    for m in task.frozen.values():
        m.to(device).eval()
    net = task.modules[task.sampled]
    net.load_state_dict(weights)
    return cfg, task, net.to(device).eval()


@torch.no_grad()
def sample_checkpoint(path: Path, n: int, out: Path, seed: int = 0, use_ema: bool = True,
                      overrides: list[str] = (), only_class: int | None = None) -> Path:
    """`n` images from a checkpoint directory, a run directory or an exported .safetensors file: the sample set
    of `seed` that training's grids (with train.seed) and evaluation (with eval.seed) make."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, task, net = load_model(path, use_ema, device, overrides)
    if only_class is not None:
        if not 0 <= only_class < task.num_classes:
            raise ConfigError(f"--class {only_class}: the model has {task.num_classes} classes"
                              + (f" (0 .. {task.num_classes - 1})" if task.num_classes else " (unconditional)"))
        task.only_class = only_class
    chunk = cfg.eval.batch_size
    images = torch.cat([sample_chunk(task, net, seed, start, min(chunk, n - start), device, nullcontext)
                        for start in range(0, n, chunk)])
    save_images(to_hwc(images), out, nrow=10 if task.num_classes else 0)
    return out
