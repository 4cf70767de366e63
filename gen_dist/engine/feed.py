"""What the loop trains on: each step's device micro-batches from data.path's stream, or from the source that a
weighted mixture (data.sources) plans for the step, and the stream positions a checkpoint carries."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from gen_dist.data import BadSamples, Catalog, DataError, DataPosition, make_loader, make_stream
from gen_dist.data.bucketed import BUCKET_KEYS
from gen_dist.data.mixture import source_at, source_configs
from gen_dist.data.text import TEXT_KEYS
from gen_dist.images import to_model_range
from gen_dist.schema import RunConfig


class Feed:
    def __init__(self, cfg: RunConfig, catalogs: list[Catalog], acc: Any, event: Callable[..., None]) -> None:
        self.cfg, self.acc, self.event = cfg, acc, event
        sources = source_configs(cfg)
        self.names = [n for n, _ in sources]
        self.streams = [make_stream(c, cat, acc.process_index, acc.num_processes)
                        for (_, c), cat in zip(sources, catalogs, strict=True)]
        self.positions = [DataPosition() for _ in self.streams]
        self.weights = np.array([s.weight for s in cfg.data.sources] or [1.0])
        self.drawn = np.zeros(len(self.streams), dtype=np.int64)
        """Samples each source gave, over all ranks, since the run began."""
        self.bad = BadSamples(acc.process_index)
        self.mixed = bool(cfg.data.sources)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """The image shapes (height, width) the run's batches come in."""
        table = getattr(self.streams[0], "table", None)
        return table or [(self.cfg.data.resolution, self.cfg.data.resolution)]

    @property
    def latents(self) -> bool:
        return self.streams[0].latents

    def describe(self) -> dict[str, Any]:
        """Batches per rank in each source's epoch."""
        counts = {n: s.batches_per_epoch for n, s in zip(self.names, self.streams, strict=True)}
        return {"batches_per_epoch": counts[self.names[0]] if not self.mixed else counts}

    def state_dict(self) -> dict[str, Any]:
        own = [p.state_dict(s.layout) for p, s in zip(self.positions, self.streams, strict=True)]
        if not self.mixed:
            return own[0]
        return {"sources": dict(zip(self.names, own, strict=True)), "drawn": self.drawn.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.mixed != ("sources" in state):
            raise DataError("the checkpoint's data position is of " + ("one source" if self.mixed else
                            "data.sources") + "; resume with the data it was trained on")
        parts = [state["sources"].get(n) for n in self.names] if self.mixed else [state]
        if any(p is None for p in parts):
            raise DataError(f"the checkpoint has positions of the sources {sorted(state['sources'])}, not of "
                            f"{self.names}")
        for i, part in enumerate(parts):
            self.positions[i], saved = DataPosition.from_state_dict(part, self.streams[i].layout)
            if saved is not None:
                # Another world size (or workers, batch, buffer): the rest of the epoch is spread anew.
                self.event("data_layout_changed", source=self.names[i], saved=saved.to_list(),
                           now=self.streams[i].layout.to_list())
        if self.mixed:
            self.drawn = np.asarray(state["drawn"], dtype=np.int64)

    def metrics(self) -> dict[str, float]:
        if not self.mixed:
            return {"epoch": self.positions[0].epoch}
        out: dict[str, float] = {"epoch": min(p.epoch for p in self.positions)}
        for name, pos, n in zip(self.names, self.positions, self.drawn, strict=True):
            out[f"data/{name}/epoch"] = pos.epoch
            out[f"data/{name}/samples"] = int(n)
        return out

    def steps(self, step: int, accum: int, channels_last: bool) -> Iterator[list[dict[str, Any]]]:
        """Each step's micro-batches from step `step` on: all of one source."""
        feeds = [self.batches(i, channels_last) for i in range(len(self.streams))]
        per_step = self.cfg.data.batch_size * self.acc.num_processes * accum
        while True:
            i = source_at(self.cfg.train.seed, step, self.weights) if self.mixed else 0
            micro = [next(feeds[i]) for _ in range(accum)]
            self.drawn[i] += per_step
            step += 1
            yield micro

    def batches(self, i: int = 0, channels_last: bool = False) -> Iterator[dict[str, Any]]:
        """Endless device batches of source `i`; advances its epochs and keeps its position."""
        pos, stream, device = self.positions[i], self.streams[i], self.acc.device
        while True:
            stream.set_position(pos.epoch, pos.batch, pos.done)
            plan = getattr(stream, "plan", None)
            if plan is not None:
                self.event("data_plan", source=self.names[i], epoch=pos.epoch, steps=plan.steps,
                           padding=round(plan.padding, 4), from_step=stream.first_step, most_held=stream.held_at_most)
            if stream.dropped:
                self.event("data_dropped", source=self.names[i], epoch=pos.epoch, samples=stream.dropped,
                           reason="fewer samples left in the epoch than ranks x workers")
            for batch in make_loader(stream, self.cfg.data.num_workers, self.cfg.data.prefetch,
                                     pin_memory=device.type == "cuda"):
                pos.batch += 1
                self.bad.note(batch)
                x = batch["image"].to(device, non_blocking=True)
                name = "latent" if stream.latents else "x"  # pre-encoded latents go in as they are
                x = x if stream.latents else to_model_range(x)
                yield {
                    name: x.contiguous(memory_format=torch.channels_last) if channels_last else x,
                    "label": batch["label"].to(device, non_blocking=True),
                    "key": batch["key"],
                    **({"caption": batch["caption"]} if "caption" in batch else {}),
                    **{k: batch[k].to(device, non_blocking=True) for k in (*TEXT_KEYS, *BUCKET_KEYS) if k in batch},
                }
            pos.next_epoch()
