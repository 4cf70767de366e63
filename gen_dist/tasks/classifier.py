"""A small CNN classifier of the training data. Not a generative family: it is trained by the same loop so that
evaluation gets a fast domain feature extractor (its pooled penultimate layer) and class probabilities."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gen_dist.artifact import resolve, weights_digest
from gen_dist.family import Batch, Checkpointable, Family, Nets, Phase, Task, register
from gen_dist.images import to_model_range
from gen_dist.schema import ConfigError, RunConfig


@dataclass
class ClassifierConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    """Conv channels per level (each level halves the resolution); the last is the feature size."""
    num_classes: int = 10
    """Classes of the dataset it learns to tell apart."""


class ConvClassifier(Checkpointable):
    def __init__(self, channels: list[int], image_channels: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = image_channels
        for c in channels:
            layers += [nn.Conv2d(prev, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            prev = c
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(prev, num_classes)
        self.levels = len(channels)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack(self.body, x, self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ClassifierTask(Task):
    sampled = "classifier"
    generates = False

    def __init__(self, cfg: RunConfig) -> None:
        c = cfg.classifier
        self.num_classes = c.num_classes
        self.modules = {"classifier": ConvClassifier(c.channels, cfg.data.channels, c.num_classes)}
        self.phases = [Phase("classify", "classifier", self.loss)]

    def loss(self, nets: Nets, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = nets["classifier"](batch["x"]).float()
        loss = F.cross_entropy(logits, batch["label"])
        accuracy = (logits.argmax(dim=1) == batch["label"]).float().mean()
        return loss, {"loss": loss.detach(), "accuracy": accuracy.detach()}


def check(cfg: RunConfig) -> None:
    if cfg.task == "classifier" and any(c % 8 for c in cfg.classifier.channels):
        raise ConfigError(f"config key 'classifier.channels' must be multiples of 8 (GroupNorm groups), got "
                          f"{cfg.classifier.channels}")


register(Family("classifier", ClassifierConfig, ClassifierTask,
                "CNN classifier of the data: the domain feature extractor of evaluation (generates nothing)",
                positive=("num_classes",), check=check))


class DomainClassifier:
    """A classifier trained by gen_dist on the dataset (task: classifier); its pooled penultimate layer gives
    the features and its head the logits. Fast on CPU; its scores are comparable only with each other."""

    name = "domain"

    def __init__(self, path: Path, device: torch.device) -> None:
        art = resolve(path, "a domain classifier")
        cfg = art.config()
        weights = art.sampled_weights(cfg, use_ema=True)
        if cfg.task != "classifier":
            raise ConfigError(f"eval extractor {path} is a {cfg.task} run, not a classifier: train one with "
                              f"`gen-dist train configs/classifier_<dataset>.yaml`")
        self.net: nn.Module = ClassifierTask(cfg).modules["classifier"]
        self.net.load_state_dict(weights)
        self.net.to(device).eval()
        self.device, self.resolution, self.channels = device, cfg.data.resolution, cfg.data.channels
        self.ident = f"domain-{weights_digest(weights)[:12]}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape[1] != self.channels:
            raise ConfigError(f"the domain classifier takes {self.channels}-channel images, got {images.shape[1]}")
        x = to_model_range(images.to(self.device))
        if x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True)
        h = self.net.features(x)
        return h, self.net.head(h)
