"""The one training loop: every family's phases, accumulation, mixed precision, EMA, checkpoints, logging."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gen_dist import checkpoint, dist, parallel
from gen_dist.config import RunConfig, save_config, to_dict
from gen_dist.data import Layout, Segment, ShardStream, make_loader
from gen_dist.evaluation import Evaluator
from gen_dist.images import grid, to_uint8
from gen_dist.launch import preflight
from gen_dist.tasks import TASKS, Phase, Task
from gen_dist.track import Tracker, wandb_init_kwargs, wandb_mode

PREEMPTED = "preempted.json"
"""Written to the run directory when a signal stopped the run after a checkpoint; job scripts requeue on it."""


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base LR at a step: linear warmup from 0, then constant, linear decay to 0 or a half
    cosine to 0 at `total` (the schedules of diffusers' get_scheduler, without importing diffusers)."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1 - progress)
        if schedule == "cosine":
            return max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))
        return 1.0

    return factor


class MetricWindow:
    """Stats accumulated between two log records; stays on device until logged (no per-step sync)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.totals: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = defaultdict(int)
        self.wait = self.elapsed = 0.0
        self.steps = 0

    def add(self, stats: dict[str, torch.Tensor], wait: float, elapsed: float) -> None:
        for k, v in stats.items():
            self.totals[k] = self.totals[k] + v if k in self.totals else v.clone()
            self.counts[k] += 1
        self.wait, self.elapsed, self.steps = self.wait + wait, self.elapsed + elapsed, self.steps + 1

    def summary(self, global_batch: int) -> dict[str, float]:
        out = {k: (self.totals[k] / self.counts[k]).item() for k in sorted(self.totals)}
        out["images_per_s"] = global_batch * self.steps / self.elapsed
        out["data_wait_frac"] = self.wait / self.elapsed
        return out


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch: int = 0
    """Batches consumed on each rank in the current epoch since the data layout last changed."""
    done: tuple[Segment, ...] = ()
    """Earlier parts of the current epoch, read under other data layouts (other world sizes, workers...)."""
    images: int = 0
    """Training images consumed over all ranks."""
    nonfinite: int = 0
    """Consecutive steps with a phase skipped for a non-finite loss or gradient."""


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        parallel.adopt_launcher_strategy(cfg)
        preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        self.cfg, self.run_dir = cfg, cfg.out_dir
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.task: Task = TASKS[cfg.task](cfg)
        self.trained = list(dict.fromkeys(p.module for p in self.task.phases))
        self.acc = acc = parallel.make_accelerator(cfg, self.trained, "wandb" if wandb_mode(cfg) else None)
        if dist.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        acc.wait_for_everyone()
        self.stream = ShardStream(
            cfg.data.path, cfg.data.split, cfg.data.batch_size, acc.process_index, acc.num_processes,
            cfg.data.num_workers, cfg.train.seed, cfg.data.shuffle_buffer, cfg.data.resolution,
            cfg.data.channels, cfg.data.hflip, cfg.data.strict)
        self.state = TrainState()
        self.skipped_phases = 0
        self.bad_samples: list[str] = []  # reports of unusable samples since the last log record
        self.bad_count = 0
        self.stopped = ""  # the signal that stopped the run early, if one did
        self.last_checkpoint: Path | None = None  # the newest checkpoint this run resumed from or wrote
        self.evaluator: Evaluator | None = None  # made at the first evaluation (reference features, extractors)
        # A whole copy of the sampled module: under sharding the trained one holds only this rank's part.
        self.sample_net = copy.deepcopy(self.task.modules[self.task.ema_module]).to(acc.device).eval()
        self.sample_net.requires_grad_(False)
        self._prepare()
        self.layout = parallel.layout_for(cfg, acc)
        ema_of = self.modules[self.task.ema_module]
        self.ema = parallel.EMA(ema_of, cfg.train.ema_decay, self.layout) if cfg.train.ema_decay > 0 else None
        self.tracker = Tracker(acc, cfg, self.run_dir)

    # ------------------------------------------------------------------------------------------ set-up

    def _prepare(self) -> None:
        o = self.cfg.optim
        opts = {n: torch.optim.AdamW(self.task.modules[n].parameters(), lr=o.lr, betas=tuple(o.betas),
                                     weight_decay=o.weight_decay) for n in self.trained}
        factor = lr_factor(o.schedule, o.warmup_steps, self.cfg.train.steps)
        scheds = {n: torch.optim.lr_scheduler.LambdaLR(opt, factor) for n, opt in opts.items()}
        self.wrapped = parallel.prepare(self.acc, self.cfg, self.task.modules, opts, scheds)
        self.scheds = {n: w.sched for n, w in self.wrapped.items()}
        self.modules = {n: w.module for n, w in self.wrapped.items()}

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all ranks and micro-batches."""
        return self.cfg.data.batch_size * self.cfg.train.grad_accum * self.acc.num_processes

    def _autocast(self, phase: Phase) -> Any:
        return parallel.autocast(self.acc, self.cfg) if phase.autocast else nullcontext()

    # ------------------------------------------------------------------------------------------ state

    def resume(self) -> bool:
        t0 = time.perf_counter()
        found = checkpoint.latest_verified(self.run_dir)
        if found is None:
            return False
        path = self.last_checkpoint = found[0]
        changed = checkpoint.version_changes(found[1])
        if changed:
            # Shown before anything is loaded, so that a load that fails on a format change is explained.
            dist.print0(f"warning: {path} was written under other versions ({', '.join(changed)}); resuming "
                        f"with this environment's", file=sys.stderr)
            self.tracker.event("versions_changed", checkpoint=str(path), changes=changed)
        meta, ema = checkpoint.load(self.acc, *found)
        done = tuple(Segment(Layout(*d["layout"]), d["consumed"]) for d in meta["data_done"])
        batch = meta["batch"]
        saved = Layout(*meta["data_layout"])
        if saved != self.stream.layout:
            # Another world size (or workers, batch, buffer): the rest of the epoch is spread anew.
            done, batch = ((*done, Segment(saved, batch)) if batch else done), 0
            self.tracker.event("data_layout_changed", saved=saved.to_list(), now=self.stream.layout.to_list())
        self.state = TrainState(step=meta["step"], epoch=meta["epoch"], batch=batch, done=done,
                                nonfinite=meta["nonfinite"], images=meta["images"])
        if self.ema is not None and ema is not None:
            self.ema.load_state_dict(ema, meta["ema_updates"])
        self.tracker.event("resume", checkpoint=str(path), step=self.state.step,
                           seconds=round(time.perf_counter() - t0, 3))
        return True

    def save(self) -> Path:
        t0 = time.perf_counter()
        s = self.state
        files = {}  # consolidated on every rank (collectives), written by the main rank
        if self.ema is not None:
            files[checkpoint.EMA] = self.ema.state_dict()
        if self.cfg.parallel.strategy != "ddp":
            files[checkpoint.WEIGHTS] = parallel.full_state_dict(self.modules[self.task.ema_module], self.layout)
        meta = {"epoch": s.epoch, "batch": s.batch, "nonfinite": s.nonfinite, "world_size": self.acc.num_processes,
                "images": s.images, "data_layout": self.stream.layout.to_list(),
                "data_done": [{"layout": d.layout.to_list(), "consumed": d.consumed} for d in s.done],
                "modules": list(self.modules), "strategy": self.cfg.parallel.strategy,
                "ema_updates": self.ema.updates if self.ema is not None else 0}
        path = self.last_checkpoint = checkpoint.save(self.acc, self.run_dir, s.step, meta, files,
                                                      self.cfg.train.keep_checkpoints)
        self.tracker.event("checkpoint", step=s.step, path=str(path), seconds=round(time.perf_counter() - t0, 3))
        return path

    # ------------------------------------------------------------------------------------------ data

    def _batches(self):
        """Endless stream of device batches; advances the epoch and keeps the position in self.state."""
        while True:
            self.stream.set_position(self.state.epoch, self.state.batch, self.state.done)
            if self.stream.dropped:
                self.tracker.event("data_dropped", epoch=self.state.epoch, samples=self.stream.dropped,
                                   reason="fewer samples left in the epoch than ranks x workers")
            for batch in make_loader(self.stream, self.cfg.data.num_workers):
                self.state.batch += 1
                self._note_bad(batch)
                yield {
                    "x": batch["image"].to(self.acc.device, non_blocking=True).float() / 127.5 - 1,
                    "label": batch["label"].to(self.acc.device, non_blocking=True),
                    "key": batch["key"],
                }
            self.state.epoch, self.state.batch, self.state.done = self.state.epoch + 1, 0, ()

    def _note_bad(self, batch: dict[str, Any]) -> None:
        if batch["bad_count"]:
            self.bad_count += batch["bad_count"]
            self.bad_samples += batch["bad"]
            for message in batch["bad"]:
                print(f"[rank {self.acc.process_index}] bad data: {message}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------------------------------ step

    def run_phase(self, index: int, micro: list[dict[str, Any]], step: int) -> dict[str, torch.Tensor]:
        phase = self.task.phases[index]
        trained = self.wrapped[phase.module]
        for name, m in self.modules.items():
            m.requires_grad_(name == phase.module)
        nets = {n: (trained.model if n == phase.module else m) for n, m in self.modules.items()}
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.acc.device))
        with trained.double_backward() if phase.double_backward else nullcontext():
            self._micro_steps(phase, index, micro, step, nets, sums)
        norm, stepped = trained.step(self.cfg.optim.grad_clip)
        sums[f"{phase.name}/grad_norm"] = norm.to(self.acc.device)
        if not stepped:
            self.skipped_phases += 1
        return sums

    def _micro_steps(self, phase: Phase, index: int, micro: list[dict[str, Any]], step: int,
                     nets: dict[str, Any], sums: dict[str, torch.Tensor]) -> None:
        trained = self.wrapped[phase.module]
        for i, batch in enumerate(micro):
            # Seeded by the micro-batch's place in the global batch, not by rank: 1 process accumulating
            # k micro-batches draws the same noise as k processes with one each.
            global_micro = self.acc.process_index * len(micro) + i
            torch.manual_seed(dist.derive_seed(self.cfg.train.seed, step, index, global_micro))
            with trained.sync(last=i == len(micro) - 1):
                with self._autocast(phase):
                    loss, stats = phase.loss(nets, batch, step)
                trained.backward(loss, len(micro))
            for k, v in stats.items():
                sums[f"{phase.name}/{k}"] += v.float() / len(micro)

    def train_step(self, micro: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        step = self.state.step
        stats: dict[str, torch.Tensor] = {}
        self.skipped_phases = 0
        for index, phase in enumerate(self.task.phases):
            if step % phase.every == 0:
                stats.update(self.run_phase(index, micro, step))
        self._count_nonfinite(step)
        stats["nonfinite_skips"] = torch.tensor(float(self.skipped_phases))
        for sched in self.scheds.values():
            sched.step()
        if self.ema is not None:
            self.ema.update()
        self.state.step += 1
        self.state.images += self.global_batch
        return stats

    def _log_keys(self, micro: list[dict[str, Any]]) -> None:
        """This rank's sample keys of the coming step, one JSON line per step (a resumed run appends)."""
        line = json.dumps({"step": self.state.step, "keys": [k for b in micro for k in b["key"]]})
        with open(self.run_dir / f"keys_rank{self.acc.process_index}.jsonl", "a") as f:
            f.write(line + "\n")

    def _count_nonfinite(self, step: int) -> None:
        """A step with a skipped phase counts; `train.max_nonfinite_steps` of them in a row stop the run."""
        self.state.nonfinite = self.state.nonfinite + 1 if self.skipped_phases else 0
        if self.skipped_phases:
            self.tracker.event("nonfinite", step=step, phases=self.skipped_phases, in_a_row=self.state.nonfinite)
        if self.state.nonfinite >= self.cfg.train.max_nonfinite_steps:
            last = self.last_checkpoint
            raise parallel.NonFiniteError(
                f"{self.state.nonfinite} steps in a row (up to step {step}) had a non-finite loss or gradient and "
                f"were skipped; stopping. The last good checkpoint is {last or 'none'}: resume from it with a "
                f"lower optim.lr, optim.grad_clip or train.mixed_precision=no")

    # ------------------------------------------------------------------------------------------ outputs

    @torch.no_grad()
    def sample(self, n: int, seed: int | None = None) -> torch.Tensor:
        """`n` images from the EMA (or raw) model, generated in parts on every rank and gathered."""
        per_rank = math.ceil(n / self.acc.num_processes)
        seed = self.cfg.train.seed if seed is None else seed
        # A fixed seed per rank (not per step) makes successive grids comparable.
        gen = torch.Generator().manual_seed(dist.derive_seed(seed, self.acc.process_index))
        labels = self.task.sample_labels(per_rank * self.acc.num_processes, self.acc.device)
        if labels is not None:
            labels = labels[self.acc.process_index * per_rank : (self.acc.process_index + 1) * per_rank]
        with parallel.autocast(self.acc, self.cfg):
            images = self.task.sample(self._sampler(), labels, per_rank, gen).float()
        return dist.gather_cat(self.acc, images)[:n]

    def _sampler(self) -> torch.nn.Module:
        """The whole sampled module with the current EMA (or raw) weights, on every rank."""
        weights = (self.ema.state_dict() if self.ema is not None
                   else parallel.full_state_dict(self.modules[self.task.ema_module], self.layout))
        self.sample_net.load_state_dict(weights)
        return self.sample_net

    def evaluate(self) -> dict[str, float]:
        """eval.metrics of the EMA (or raw) model, logged at the current step."""
        if self.evaluator is None:
            self.evaluator = Evaluator(self.cfg, self.acc, self.run_dir)
        scores = self.evaluator.run(self.task, self._sampler(), lambda: parallel.autocast(self.acc, self.cfg))
        self.tracker.log(self.state.step, scores)
        self.tracker.event("eval", step=self.state.step, n=self.cfg.eval.n, seconds=round(scores["eval/seconds"], 2),
                           skipped=self.evaluator.skipped)
        return scores

    def write_samples(self) -> Path:
        images = to_uint8(self.sample(self.cfg.train.sample_n))
        path = self.run_dir / "samples" / f"step_{self.state.step:08d}.png"
        if dist.is_main():
            picture = grid(images, nrow=10 if self.task.num_classes else 0)
            path.parent.mkdir(parents=True, exist_ok=True)
            picture.save(path)
            self.tracker.image(self.state.step, "samples", np.asarray(picture))
        self.tracker.event("samples", step=self.state.step, path=str(path))
        return path

    # ------------------------------------------------------------------------------------------ loop

    def _start_event(self, resumed: bool) -> None:
        cfg, acc = self.cfg, self.acc
        if wandb_mode(cfg) and dist.is_main():
            acc.init_trackers(cfg.wandb.project, config=to_dict(cfg),
                              init_kwargs={"wandb": wandb_init_kwargs(cfg, self.run_dir)})
        params = {n: sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters()) for n, m in self.modules.items()}
        self.tracker.event(
            "start", task=cfg.task, world_size=acc.num_processes, distributed_type=str(acc.distributed_type),
            backend=str(acc.state.backend), device=str(acc.device), mixed_precision=cfg.train.mixed_precision,
            step=self.state.step, resumed=resumed, params=params,
            batches_per_epoch=self.stream.batches_per_epoch,
            global_batch=self.global_batch)

    def _log(self, window: MetricWindow, bar: tqdm) -> None:
        metrics = window.summary(self.global_batch)
        metrics.update({f"lr/{n}": s.get_last_lr()[0] for n, s in self.scheds.items()})
        metrics["data/bad_samples"] = float(self.bad_count) * self.acc.num_processes  # the mean becomes the sum
        metrics = dist.mean_across_ranks(self.acc, metrics)
        metrics.update(epoch=self.state.epoch, images_seen=self.state.images)
        if metrics["data/bad_samples"]:
            for rank, reports in enumerate(dist.all_objects(self.acc, self.bad_samples)):
                if reports:
                    self.tracker.event("bad_data", step=self.state.step, rank=rank, samples=reports[:20])
        self.bad_samples, self.bad_count = [], 0
        self.tracker.log(self.state.step, metrics)
        bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k.endswith("/loss")})
        window.reset()

    def train(self) -> TrainState:
        t = self.cfg.train
        resumed = self.resume()
        self._start_event(resumed)
        batches = self._batches()
        window = MetricWindow()
        bar = tqdm(total=t.steps, initial=self.state.step, dynamic_ncols=True,
                   disable=not (t.progress and dist.is_main()))
        saved_at = self.state.step if resumed else -1
        stop = dist.StopRequest()
        try:
            self._loop(batches, window, bar, saved_at, stop)
        finally:
            stop.restore()
        return self.state

    def _loop(self, batches, window: MetricWindow, bar: tqdm, saved_at: int, stop: dist.StopRequest) -> None:
        t = self.cfg.train
        while self.state.step < t.steps:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(t.grad_accum)]
            t1 = time.perf_counter()
            if t.log_keys:
                self._log_keys(micro)
            stats = self.train_step(micro)
            window.add(stats, wait=t1 - t0, elapsed=time.perf_counter() - t0)
            bar.update(1)
            step = self.state.step
            if step % t.log_every == 0 or step == t.steps:
                self._log(window, bar)
            if t.sample_every and step % t.sample_every == 0 and step < t.steps and self.task.generates:
                self.write_samples()
            if self.cfg.eval.every and (step % self.cfg.eval.every == 0 or step == t.steps):
                self.evaluate()
            if step % t.ckpt_every == 0:
                self.save()
                saved_at = step
            signum = stop.agreed(self.acc)
            if signum:
                self._stop(signum, saved=saved_at == step)
                return
        bar.close()
        if saved_at != self.state.step:
            self.save()
        if self.task.generates:
            self.write_samples()
        self.tracker.event("end", step=self.state.step)
        self.tracker.close()

    def _stop(self, signum: int, saved: bool) -> None:
        """Every rank agreed to stop after this step: one checkpoint, and a marker telling a job script to
        requeue (the restarted run resumes from the checkpoint by itself)."""
        path = self.last_checkpoint if saved else self.save()
        name = signal.Signals(signum).name
        if dist.is_main():
            marker = {"step": self.state.step, "signal": name, "checkpoint": str(path)}
            (self.run_dir / PREEMPTED).write_text(json.dumps(marker))
        self.tracker.event("preempted", step=self.state.step, signal=name, checkpoint=str(path))
        self.tracker.close()
        self.stopped = name
