"""The task contract and the registry of model families.

A task declares to the engine its modules (trained and frozen), its phases, an optional cross-rank update after
each step, and how it samples. A family registers itself, with its config section and checks, when its module is
imported: the built-in ones live in `gen_dist.tasks`, and GEN_DIST_PLUGINS (comma-separated module names) adds
others, in every process of a run. Reading the registry imports the family modules, which import heavy libraries
(diffusers) only where they use them."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

from gen_dist.schema import ConfigError

if TYPE_CHECKING:
    from gen_dist.schema import RunConfig

Batch = Mapping[str, torch.Tensor]
Nets = Mapping[str, nn.Module]
LossFn = Callable[[Nets, Batch, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""(nets, batch, step) -> (loss to minimise, detached stats). `nets` holds every module of the task: the one the
phase trains as the strategy wraps it, the other trained ones and the frozen ones as plain modules. A training
batch holds `x` (images in [-1, 1]), `label`, `key` and `micro`: its index in the step's global batch (0 ..
ranks x grad_accum - 1), the same whatever the number of ranks; the FLOP count's batch has no `micro`."""
Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over all ranks (in place, and returns it); the identity in a single process."""


@dataclass
class Phase:
    name: str
    """Name used in metrics (e.g. 'D', 'G', 'D_r1')."""
    trains: str
    """The module this phase trains; its optimizer steps and it alone has requires_grad."""
    loss: LossFn
    every: int = 1
    """Run at steps where step % every == 0 (lazy regularisation)."""
    autocast: bool = True
    """Run under mixed-precision autocast; regularisers with double backward run in fp32."""
    double_backward: bool = False
    """The loss differentiates through a gradient (create_graph=True), e.g. R1."""
    start: int = 0
    """First step this phase runs at (e.g. a discriminator that joins once reconstructions are sharp)."""

    def due(self, step: int) -> bool:
        return step >= self.start and step % self.every == 0


class StepSums:
    """Statistics summed over this step's training micro-batches on this rank, then over ranks by `take` in the
    task's `after_step`: the input of an update kept outside autograd (an EMA codebook, an adaptive
    augmentation probability). The FLOP count's batch is not a training micro-batch and is not added."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None

    def add(self, batch: Batch, value: torch.Tensor) -> None:
        if "micro" in batch:
            self.total = value if self.total is None else self.total + value

    def take(self, reduce: Reduce) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("StepSums.take: no training micro-batch added a value this step")
        total, self.total = self.total, None
        return reduce(total)


class Task:
    """A model family. Subclasses fill `modules`, `phases` and `sampled` (and `frozen` where they use
    pretrained networks), and implement `sample` when they generate."""

    modules: dict[str, nn.Module]
    """Trained modules: each gets an optimizer, is wrapped by the strategy and is checkpointed."""
    frozen: Mapping[str, nn.Module] = MappingProxyType({})
    """Modules that are not trained (a pretrained first stage, a feature network): the task loads them (from a
    path in its config section), the engine moves them to the device in eval mode and passes them to every loss;
    they get no optimizer, no wrapping and are never saved."""
    phases: list[Phase]
    sampled: str
    """The module that generates (or, for the classifier, that evaluation uses): sample grids, EMA, export."""
    num_classes: int = 0
    generates: bool = True
    """False for the classifier that evaluation uses: nothing to sample."""
    optim: Mapping[str, Mapping[str, Any]] = MappingProxyType({})
    """Per trained module, optimizer settings that replace optim.* for it (`lr`, `betas`): e.g. a GAN's two
    time-scale update rule."""
    only_class: int | None = None
    """When set, every sample is of this class (`gen-dist sample --class K`)."""
    prompted: bool = False
    """A text model: its samples are drawn from prompts."""
    prompts: list[str] | None = None
    """Text models: when set, sample i is of prompts[i % len(prompts)] (`gen-dist sample --prompt`, grids of
    train.sample_prompts); otherwise of its class's prompt."""
    frozen_from: Mapping[str, str] = MappingProxyType({})
    """Frozen modules that sampling needs, each with the config key naming its source (e.g. a latent model's
    first stage): exports carry them, and a model loaded from an export takes them from it."""
    for_sampling: tuple[str, ...] = ()
    """Config overrides applied when a trained model is loaded to sample, evaluate or serve as a first stage:
    they drop what only training needs (a perceptual network, a discriminator), whose files may be gone."""
    reconstructs: bool = False
    """An autoencoder: its samples are `reconstruct`ions of the evaluation split's images, in order, so grids
    show them and `gen-dist eval` scores them (rFID, PSNR)."""

    def state_dict(self) -> dict[str, Any]:
        """State kept outside the modules that a resume must restore (e.g. an adaptive augmentation
        probability): plain JSON data, written into the checkpoint's meta file."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def scheduled(self, images: int, global_batch: int) -> dict[str, Any]:
        """Called on every rank before each step with the images trained so far (all ranks) and the step's global
        batch: the task sets its own scheduled values (a penalty's weight, an augmentation probability) and
        returns those the engine applies, a pure function of `images` so that a resume continues them exactly:
        `lr/NAME` and `betas/NAME` (a pair) for trained module NAME's optimizer, `ema_decay` for this step's
        update of the sampled module's EMA."""
        return {}

    def after_step(self, nets: Nets, reduce: Reduce, step: int) -> dict[str, torch.Tensor] | None:
        """Called on every rank after each step's optimizer steps, e.g. for an update kept outside autograd
        (an EMA codebook); `reduce` sums over ranks so that every rank holds the same result. Returns stats to
        log (the same on every rank), if any."""
        return None

    @torch.no_grad()
    def reconstruct(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Tasks that `reconstructs`: `net`'s reconstruction of images `x`, in [-1, 1]."""
        raise NotImplementedError

    def real_images(self, start: int, size: int) -> torch.Tensor:
        """Tasks that `reconstructs`: images [start, start + size) of the evaluation split (uint8, N C H W)."""
        raise NotImplementedError

    def prompts_at(self, labels: torch.Tensor | None) -> list[str] | None:
        """Text models: the prompt of each of these sample labels."""
        return None

    @contextmanager
    def prompting(self, prompts: list[str] | None) -> Iterator[None]:
        """Samples drawn from `prompts` (None: from class prompts) inside the block, and as before after it."""
        self.prompts = prompts or None
        try:
            yield
        finally:
            self.prompts = None

    @torch.no_grad()
    def sample(self, net: nn.Module, labels: torch.Tensor | None, n: int,
               generator: torch.Generator) -> torch.Tensor:
        """`n` images in [-1, 1] from `net` (the EMA or raw copy of the sampled module)."""
        raise NotImplementedError

    def sample_labels(self, n: int, device: torch.device) -> torch.Tensor | None:
        """Grid labels: one class per column of a ten-wide grid when conditional (all `only_class` if set); for
        text models with `prompts`, indices into them."""
        if self.prompts:
            return torch.arange(n, device=device) % len(self.prompts)
        if not self.num_classes:
            return None
        if self.only_class is not None:
            return torch.full((n,), self.only_class, device=device)
        return torch.arange(n, device=device) % self.num_classes


@dataclass(frozen=True)
class Family:
    """A model family as the registry knows it. Its config section is the dataclass `section` under the key
    `name`; task names, the config schema, `gen-dist train --help` and config errors all come from here."""

    name: str
    section: type
    """Dataclass of the family's config keys, one docstring per field."""
    task: type[Task]
    help: str
    """One line for `gen-dist train --help`."""
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    """Allowed values of section keys (relative names)."""
    positive: tuple[str, ...] = ()
    """Section keys that must be > 0."""
    sampling_keys: tuple[str, ...] = ()
    """Section keys that only change how samples are drawn: a run may resume with other values."""
    check: Callable[[RunConfig], None] | None = None
    """Checks across keys; run for every registered family (`cfg.task` tells whether it is the one trained)."""
    resolve: Callable[[RunConfig], None] | None = None
    """Fills keys that another source decides (a pretrained pipeline) before any check runs; run for every
    registered family, again at each validation, so it leaves a resolved config as it is."""


class Checkpointable(nn.Module):
    """A module whose nn.Sequential stacks can be recomputed in backward instead of kept
    (train.activation_checkpointing), switched on by the method diffusers models have for the same thing."""

    gradient_checkpointing = False

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def stack(self, layers: nn.Sequential, x: torch.Tensor, segments: int) -> torch.Tensor:
        """`layers(x)`; when checkpointing and building a graph, in `segments` pieces of which all but the last
        keep only their input."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint_sequential(layers, segments, x, use_reentrant=False)
        return layers(x)


# ---------------------------------------------------------------------------------------------- registry

BUILTIN = ("diffusion", "gan", "vae", "autoencoder", "classifier")
PLUGINS_ENV = "GEN_DIST_PLUGINS"

_FAMILIES: dict[str, Family] = {}
_loaded = False


def register(family: Family) -> Family:
    """Called by a family module when it is imported."""
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, Family]:
    """Every registered family, by name: the built-in ones, then those of the modules in GEN_DIST_PLUGINS."""
    global _loaded
    if not _loaded:
        _loaded = True
        for name in BUILTIN:
            importlib.import_module(f"gen_dist.tasks.{name}")
        for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ConfigError(f"{PLUGINS_ENV} names {module!r}, which cannot be imported: {e}") from None
    return _FAMILIES


def family(name: str) -> Family:
    return families()[name]
