"""A trained model on disk, whatever form it has: a run directory (its newest good checkpoint), a checkpoint
directory, or a weights file (`gen-dist export`, a training snapshot, a post-hoc EMA reconstruction; one
safetensors file with the run config in its metadata). `resolve` tells which a path is; an `Artifact` reads its
config, metadata and weights for sampling, evaluation, `train.init_from`, export and a first stage. Nothing else
reads checkpoint descriptions or weights files for these."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gen_dist import checkpoint
from gen_dist.config import config_from_yaml
from gen_dist.family import Task, families, family
from gen_dist.parsing import read_yaml
from gen_dist.schema import ConfigError, RunConfig, get_value

RUN_CONFIG = "config.yaml"
"""The resolved config a run writes into its directory."""
SNAPSHOTS = "snapshots"
"""train.snapshot_every's weight files in a run directory, kept for good."""
Weights = dict[str, torch.Tensor]


def run_config_file(run_dir: Path, what: str = "") -> Path:
    """The config of a run directory; ConfigError when `run_dir` is not one (naming `what` needs one)."""
    source = run_dir / RUN_CONFIG
    if not source.is_file():
        raise ConfigError(f"{what} needs a run directory; {run_dir} has no {RUN_CONFIG}" if what else
                          f"{run_dir} is not a run directory (no {RUN_CONFIG})")
    return source


def file_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file; ConfigError for any other file."""
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for files that are not safetensors
        raise ConfigError(f"{path} is not a safetensors file: {e}") from None


def config_for_sampling(text: str, source: str, overrides: list[str]) -> RunConfig:
    """The config to sample with: the family's `for_sampling` overrides (which drop what only training needs),
    then the caller's."""
    try:
        task = (read_yaml(text) or {}).get("task", RunConfig.task)
    except yaml.YAMLError:
        task = RunConfig.task  # config_from_yaml names the error
    known = family(task).task.for_sampling if task in families() else ()
    return config_from_yaml(text, source, [*known, *overrides])


@dataclass
class Artifact:
    """A resolved trained model: `ckpt` for a checkpoint (or a run's newest), `meta` for a weights file."""

    path: Path
    ckpt: checkpoint.Description | None = None
    meta: dict[str, str] | None = None

    @property
    def is_file(self) -> bool:
        return self.ckpt is None

    @property
    def run_dir(self) -> Path:
        """The run directory it belongs to (a weights file: the one it lies in or beside)."""
        if self.ckpt is not None:
            return self.ckpt.path.parent.parent
        parent = self.path.parent
        return parent.parent if parent.name in (SNAPSHOTS, "posthoc") else parent

    @property
    def step(self) -> int:
        return self.ckpt.step if self.ckpt is not None else int(self.meta.get("step", 0))

    def config_text(self) -> tuple[str, str]:
        """The run config's YAML and where it was read from."""
        if self.ckpt is None:
            return self.meta["config"], f"metadata of {self.path}"
        source = run_config_file(self.run_dir)
        return source.read_text(), str(source)

    def config(self, overrides: list[str] = ()) -> RunConfig:
        """The config to sample with (`config_for_sampling`); a weights file that carries frozen modules (a
        latent model's first stage) names itself as their source, whatever path the run's config named."""
        text, source = self.config_text()
        own = [f"{key}={self.path}" for name, key in self._frozen_from().items() if name in self._frozen_configs()]
        return config_for_sampling(text, source, [*own, *overrides])

    def task_state(self) -> dict:
        """The task state (Task.state_dict) saved with the weights."""
        if self.ckpt is None:
            return json.loads(self.meta.get("task_state", "{}"))
        return self.ckpt.state.get("task", {})

    def weights(self, module: str, use_ema: bool) -> Weights:
        """Consolidated weights of trained module `module` (its EMA when asked and kept); a weights file holds
        the sampled module only."""
        if self.ckpt is None:
            tensors = load_file(str(self.path))
            prefix = "ema." if use_ema and any(k.startswith("ema.") for k in tensors) else "model."
            return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        if use_ema and self.ckpt.ema_file is not None:
            return load_file(str(self.ckpt.ema_file))
        return load_file(str(self.ckpt.weights_file or self.ckpt.module_file(module)))

    def sampled_weights(self, cfg: RunConfig, use_ema: bool) -> Weights:
        return self.weights(family(cfg.task).task.sampled, use_ema)

    def trained_weights(self, sampled: str) -> dict[str, Weights]:
        """train.init_from: the weights of every trained module it holds (the `sampled` module's EMA where kept).
        Modules whose consolidated weights a sharded checkpoint lacks are left out."""
        if self.ckpt is None:
            return {self.meta.get("module", sampled): self.weights(sampled, use_ema=True)}
        found = {}
        for name in self.ckpt.modules:
            if name == sampled and (self.ckpt.ema_file or self.ckpt.weights_file):
                found[name] = self.weights(name, use_ema=True)
            elif self.ckpt.module_file(name).is_file():
                found[name] = load_file(str(self.ckpt.module_file(name)))
        return found

    def frozen_config_text(self, name: str) -> str | None:
        """The run config of frozen module `name` where this weights file carries the module."""
        return self._frozen_configs().get(name)

    def source_config_text(self, name: str) -> str:
        """The config of what serves as frozen module `name` from here: the module this weights file carries
        (a latent model's export carries its first stage), else this model itself."""
        return self.frozen_config_text(name) or self.config_text()[0]

    def frozen(self, name: str) -> tuple[RunConfig, Weights] | None:
        """Frozen module `name` this weights file carries (its own run config and weights), else None."""
        text = self.frozen_config_text(name)
        if text is None:
            return None
        prefix = f"frozen.{name}."
        weights = {k.removeprefix(prefix): v for k, v in load_file(str(self.path)).items() if k.startswith(prefix)}
        return config_for_sampling(text, f"{name} config in the metadata of {self.path}", []), weights

    def _frozen_configs(self) -> dict[str, str]:
        return json.loads(self.meta.get("frozen_configs", "{}")) if self.meta is not None else {}

    def _frozen_from(self) -> dict[str, str]:
        return json.loads(self.meta.get("frozen_from", "{}")) if self.meta is not None else {}


def resolve(path: Path, what: str = "") -> Artifact:
    """The trained model at `path`; ConfigError (prefixed with `what`, the key or option that named it) when it
    is not one."""
    prefix = f"{what}: " if what else ""
    if not path.exists():
        raise ConfigError(f"{prefix}{path} does not exist")
    if path.is_file():
        meta = file_metadata(path)
        if "config" not in meta:
            hint = (": it is a post-hoc EMA snapshot; make an EMA from it with `gen-dist ema RUN --std S`"
                    if "sigma_rels" in meta else " (no config in its metadata)")
            raise ConfigError(f"{prefix}{path} is not a gen-dist export{hint}")
        return Artifact(path, meta=meta)
    if (path / checkpoint.META).is_file():
        return Artifact(path, ckpt=checkpoint.describe(path))
    found = checkpoint.latest_verified(path)
    if found is None:
        raise ConfigError(f"{prefix}{path} is neither a checkpoint nor a run directory with checkpoints")
    return Artifact(path, ckpt=found)


def weights_digest(weights: Weights) -> str:
    """SHA-1 of named weights (names and fp32 values): which trained model a cache or a dataset was made with."""
    h = hashlib.sha1()
    for k, v in sorted(weights.items()):
        h.update(k.encode() + v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def config_text_of(path: Path, what: str = "") -> str:
    """The run config's YAML of the model at `path`, read without verifying a checkpoint: the checks before
    launch use it to tell what a path holds."""
    run_dir = path.parent.parent if (path / checkpoint.META).is_file() else path
    if path.is_dir() and (run_dir / RUN_CONFIG).is_file():
        return (run_dir / RUN_CONFIG).read_text()
    return resolve(path, what).config_text()[0]  # a weights file; anything else: resolve names the problem


def load_model(path: Path, use_ema: bool, device: torch.device, overrides: list[str] = ()
               ) -> tuple[RunConfig, Task, torch.nn.Module]:
    """The task and its sampled module, loaded and in eval mode on `device`."""
    art = resolve(path)
    cfg = art.config(list(overrides))
    task = family(cfg.task).task(cfg)
    if not task.generates:
        raise ConfigError(f"{path} is a {cfg.task} run: it generates no images")
    task.load_state_dict(art.task_state())
    for m in task.frozen.values():
        m.to(device).eval()
    net = task.modules[task.sampled]
    net.load_state_dict(art.weights(task.sampled, use_ema))
    return cfg, task, net.to(device).eval()


def load_partial(module: torch.nn.Module, weights: Weights) -> dict[str, list[str]]:
    """Load the tensors of `weights` whose names and shapes match `module`'s; what was not loaded, by why."""
    own = module.state_dict()
    fits = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    module.load_state_dict(fits, strict=False)
    return {"loaded": sorted(fits), "missing": sorted(set(own) - set(weights)),
            "unexpected": sorted(set(weights) - set(own)),
            "shape_mismatch": sorted(k for k in weights if k in own and own[k].shape != weights[k].shape)}


# ---------------------------------------------------------------------------------------------- writing


def save_atomic(out: Path, tensors: Weights, meta: dict[str, str]) -> None:
    """A safetensors file written whole under another name, then renamed: a reader never sees half of one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out)


def write_weights_file(out: Path, groups: dict[str, Weights], config: str, step: int, module: str,
                       task_state: dict, frozen_from: dict[str, str] | None = None,
                       frozen_configs: dict[str, str] | None = None) -> None:
    """The file of `gen-dist export`, of training snapshots and of post-hoc EMA reconstructions: tensors under
    their group prefix (model., ema., frozen.NAME.), the run config and what sampling needs in the metadata."""
    tensors = {f"{prefix}{k}": v.detach().cpu().contiguous() for prefix, group in groups.items()
               for k, v in group.items()}
    meta = {"config": config, "step": str(step), "module": module, "task_state": json.dumps(task_state),
            "frozen_from": json.dumps(frozen_from or {}), "frozen_configs": json.dumps(frozen_configs or {})}
    save_atomic(out, tensors, meta)


def export(path: Path, out: Path) -> Path:
    """One safetensors file with the sampled module's raw (`model.*`) and EMA (`ema.*`) weights, the frozen
    modules sampling needs (`frozen.NAME.*`, e.g. a latent model's first stage, with their own configs), and the
    run config and task state in its metadata; `gen-dist sample` reads it without the run directory."""
    art = resolve(path)
    if art.ckpt is None:
        raise ConfigError(f"{path} is already a weights file; export reads a checkpoint or a run directory")
    text, _ = art.config_text()
    # As sampling would load it: without training-only parts (a perceptual network) whose files may be gone.
    cfg = art.config()
    task = family(cfg.task).task(cfg)
    name = task.sampled
    tensors = {f"model.{k}": v for k, v in art.weights(name, use_ema=False).items()}
    if art.ckpt.ema_file is not None:
        tensors.update({f"ema.{k}": v for k, v in art.weights(name, use_ema=True).items()})
    configs = {}
    for frozen, key in task.frozen_from.items():
        tensors.update({f"frozen.{frozen}.{k}": v for k, v in task.frozen[frozen].state_dict().items()})
        source = resolve(Path(str(get_value(cfg, key))), key)
        configs[frozen] = source.source_config_text(frozen)
    write_weights_file(out, {"": tensors}, text, art.step, name, art.task_state(), dict(task.frozen_from), configs)
    return out
