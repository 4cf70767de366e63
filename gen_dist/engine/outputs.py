"""The trainer's outputs besides checkpoints: sample grids, evaluations, snapshots and the best checkpoint's record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gen_dist import checkpoint, dist, parallel
from gen_dist.artifact import RUN_CONFIG, SNAPSHOTS, write_weights_file
from gen_dist.engine.state import BEST
from gen_dist.evaluation import Evaluator
from gen_dist.images import grid, to_hwc
from gen_dist.sampling import generate, sample_chunk
from gen_dist.schema import eval_metric_keys, write_atomic


class Outputs:
    """Methods of the Trainer that make its outputs from the EMA (or raw) weights of the sampled module."""

    @torch.no_grad()
    def sample(self, n: int, seed: int | None = None) -> torch.Tensor:
        """The first `n` images (uint8, N C H W, on every rank) of the sample set of `seed` (default
        train.seed) from the EMA (or raw) model: made in chunks of eval.batch_size spread over the ranks, so the
        same weights give the same images on any number of ranks and in `gen-dist sample`."""
        seed = self.cfg.train.seed if seed is None else seed
        net, device = self.sampler(), self.acc.device

        def make(start: int, size: int) -> torch.Tensor:
            return sample_chunk(self.task, net, seed, start, size, device, lambda: self.strategy.autocast(self.acc))

        d = self.cfg.data
        return generate(n, self.cfg.eval.batch_size, make, (d.channels, d.resolution, d.resolution), self.acc)

    def sampler(self) -> torch.nn.Module:
        """The whole sampled module with the current EMA (or raw) weights, on every rank."""
        weights = (self.ema.state_dict() if self.ema is not None
                   else parallel.full_state_dict(self.modules[self.task.sampled], self.layout))
        self.sample_net.load_state_dict(weights)
        return self.sample_net

    def evaluate(self) -> dict[str, float]:
        """eval.metrics of the EMA (or raw) model, logged at the current step."""
        if self.evaluator is None:
            self.evaluator = Evaluator(self.cfg, self.acc, self.run_dir)
        scores = self.evaluator.run(self.task, self.sampler(), lambda: self.strategy.autocast(self.acc))
        self.tracker.log(self.state.step, scores)
        self.tracker.event("eval", step=self.state.step, n=self.cfg.eval.n, seconds=round(scores["eval/seconds"], 2),
                           skipped=self.evaluator.skipped)
        return scores

    def write_snapshot(self) -> Path:
        """The sampled module's EMA (or raw) weights alone, as a file `gen-dist sample` and `eval` read."""
        weights = self.sampler().state_dict()  # consolidated on every rank: collectives
        path = self.run_dir / SNAPSHOTS / f"{checkpoint.step_name(self.state.step)}.safetensors"
        if dist.is_main():
            write_weights_file(path, {("ema." if self.ema is not None else "model."): weights},
                                        (self.run_dir / RUN_CONFIG).read_text(), self.state.step,
                                        self.task.sampled, self.task.state_dict())
        self.tracker.event("snapshot", step=self.state.step, path=str(path))
        return path

    def better(self, scores: dict[str, float]) -> bool:
        """train.keep_best: whether these scores beat the best so far (then recorded as the best)."""
        key = self.cfg.train.keep_best
        value, best = scores[key], self.state.best
        lower = eval_metric_keys(self.cfg, self.task.reconstructs)[key]
        if best is not None and not (value < best["value"] if lower else value > best["value"]):
            return False
        path = checkpoint.ckpt_root(self.run_dir) / checkpoint.step_name(self.state.step)
        self.state.best = {"metric": key, "value": value, "step": self.state.step, "path": str(path)}
        return True

    def write_best(self) -> None:
        if dist.is_main():
            write_atomic(self.run_dir / BEST, json.dumps(self.state.best, indent=1))
        self.tracker.event("best", **self.state.best)

    def write_samples(self) -> Path:
        prompts = list(self.cfg.train.sample_prompts) if self.task.prompted else []
        with self.task.prompting(prompts):
            images = self.sample(self.cfg.train.sample_n)
        if self.task.reconstructs:  # rows of originals, each above its reconstructions
            real = self.task.real_images(0, len(images)).to(images.device)
            images = torch.stack([real, images], 1).unflatten(0, (-1, 10)).transpose(1, 2).flatten(0, 2)
        images = to_hwc(images)
        path = self.run_dir / "samples" / f"step_{self.state.step:08d}.png"
        if dist.is_main():
            picture = grid(images, nrow=len(prompts) or (10 if self.task.num_classes or self.task.reconstructs else 0))
            path.parent.mkdir(parents=True, exist_ok=True)
            picture.save(path)
            shown = prompts or self.task.prompts_at(torch.arange(self.task.num_classes)) or []
            caption = " | ".join(f"column {i + 1}: {p}" for i, p in enumerate(shown))
            self.tracker.image(self.state.step, "samples", np.asarray(picture), caption)
        self.tracker.event("samples", step=self.state.step, path=str(path))
        return path

    # ------------------------------------------------------------------------------------------ loop
