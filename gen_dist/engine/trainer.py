"""The one training loop: every family's phases, accumulation, mixed precision, EMA, checkpoints, logging."""

from __future__ import annotations

import copy
import json
import os
import signal
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from gen_dist import checkpoint, dist, parallel, perf, posthoc
from gen_dist.artifact import RUN_CONFIG, load_partial, resolve
from gen_dist.config import validate
from gen_dist.engine.feed import Feed
from gen_dist.engine.outputs import Outputs
from gen_dist.engine.state import MetricWindow, Supervisor, TrainState, lr_factor
from gen_dist.evaluation import Evaluator
from gen_dist.family import Phase, Task, family
from gen_dist.monitor import halt_marker
from gen_dist.preflight import checked_catalogs, preflight
from gen_dist.schema import ConfigError, RunConfig, save_config, write_atomic
from gen_dist.track import Progress, Tracker, wandb_mode


class Trainer(Outputs):
    """Trains one config, whatever its family, strategy and number of ranks.

    Built from the config: the task (its trained and frozen modules, phases, sampling), the strategy's
    Accelerator and wrapped modules with their optimizers and LR schedules, the data stream, EMA and tracker.
    `train()` resumes from the run directory's newest good checkpoint and runs the one loop: every step each due
    phase of the task is run over the micro-batches and its optimizer stepped, then the schedules, the task's
    cross-rank update and the EMA; logging, sample grids, evaluation and checkpoints come at their intervals, and
    a stop signal agreed on by all ranks, or the `supervisor` (a sweep's pruner), ends the run with a checkpoint."""

    def __init__(self, cfg: RunConfig, supervisor: Supervisor | None = None) -> None:
        parallel.adopt_launcher_strategy(cfg)
        validate(cfg)
        preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        # Decided once, here, from the device this process trains on; the start event says what and why.
        self.precision_choice = perf.choose_precision(cfg)
        cfg.train.mixed_precision = self.precision_choice["chose"]
        self.cfg, self.run_dir = cfg, cfg.out_dir
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.task: Task = family(cfg.task).task(cfg)
        self.init_report = self._init_from()
        self.trained_names = list(dict.fromkeys(p.trains for p in self.task.phases))
        self.strategy = parallel.strategy_for(cfg)
        self.acc = acc = self.strategy.make_accelerator(self.trained_names, "wandb" if wandb_mode(cfg) else None)
        # The source is resolved and checked once, by the main rank (a listing, stats files, a remote probe).
        catalogs = dist.from_main(acc, lambda: checked_catalogs(cfg, acc.num_processes))
        if dist.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / RUN_CONFIG)
        acc.wait_for_everyone()
        d = cfg.data
        self.feed = Feed(cfg, catalogs, acc, lambda name, **kw: self.tracker.event(name, **kw))
        self.state = TrainState()
        self.skipped_phases = 0
        self.stopped = ""  # the signal that stopped the run early, if one did
        self.last_checkpoint: Path | None = None  # the newest checkpoint this run resumed from or wrote
        self.evaluator: Evaluator | None = None  # made at the first evaluation (reference features, extractors)
        # A whole copy of the sampled module: under sharding the trained one holds only this rank's part.
        self.sample_net = copy.deepcopy(self.task.modules[self.task.sampled]).to(acc.device).eval()
        self.sample_net.requires_grad_(False)
        # On the plain modules, still on the CPU with the count's batch: before anything is moved or wrapped.
        self.flops_per_image = perf.flops_per_image(self.task, self.task.frozen, (d.channels, d.resolution,
                                                                                    d.resolution))
        self.frozen = {n: m.to(acc.device).eval().requires_grad_(False) for n, m in self.task.frozen.items()}
        self._fast_path()
        self._prepare()
        if self.compiled:
            perf.before_compile(len(self.feed.shapes))
            for t in self.trained.values():
                self.strategy.compile(t)
        self.layout = self.strategy.weight_layout(acc)
        sampled = self.modules[self.task.sampled]
        self.ema = (parallel.EMA(sampled, parallel.warmed_decay(cfg.train.ema_decay), self.layout)
                    if cfg.train.ema_decay > 0 else None)
        self.posthoc = (posthoc.Profiles(sampled, cfg.train.posthoc_ema, self.layout) if cfg.train.posthoc_ema
                        else None)
        self.tracker = Tracker(acc, cfg, self.run_dir)
        self.watchdog = dist.Watchdog(cfg.parallel.timeout_minutes * 60, acc.process_index)
        if self.init_report:
            self.tracker.event("init_from", source=cfg.train.init_from,
                               modules={n: {k: len(v) for k, v in r.items()} for n, r in self.init_report.items()})
        self.clock = perf.StepClock(acc.device)
        self.supervisor = supervisor
        self.supervised_stop = False  # the supervisor ended the run

    # ------------------------------------------------------------------------------------------ set-up

    def _init_from(self) -> dict[str, dict[str, list[str]]]:
        """train.init_from into a run that has no checkpoint yet: per module, what was loaded and what not."""
        src = self.cfg.train.init_from
        if not src or checkpoint.list_checkpoints(self.cfg.out_dir):
            return {}
        weights = resolve(Path(src), "train.init_from").trained_weights(self.task.sampled)
        report = {name: load_partial(m, weights.get(name, {})) for name, m in self.task.modules.items()}
        if not any(r["loaded"] for r in report.values()):
            raise ConfigError(f"train.init_from: no tensor of {src} fits a module of this {self.cfg.task} model")
        for name, r in report.items():
            lost = "; ".join(f"{why} {len(keys)}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                             for why, keys in r.items() if why != "loaded" and keys)
            lost = f"; {lost}" if lost else ""
            dist.print0(f"train.init_from {src}: {name}: {len(r['loaded'])} tensors loaded{lost}")
        return report

    def _fast_path(self) -> None:
        """The switches that change how the modules run."""
        cfg, device = self.cfg, self.acc.device
        perf.configure_device(cfg, device)
        if cfg.train.activation_checkpointing:
            for name, m in self.task.modules.items():
                if not hasattr(m, "enable_gradient_checkpointing"):
                    raise ConfigError(f"train.activation_checkpointing: module '{name}' of task {cfg.task} has no "
                                      f"enable_gradient_checkpointing() (derive it from tasks.base.Checkpointable)")
                m.enable_gradient_checkpointing()

        def on(switch: str) -> bool:
            return self.strategy.allows(switch) and perf.switch_on(getattr(cfg.train, switch), device)

        self.channels_last, self.compiled = on("channels_last"), on("compile")
        self.peak_tflops, self.device_name = perf.peak_tflops(cfg, device)
        if self.channels_last:
            for m in [*self.task.modules.values(), *self.frozen.values()]:
                perf.to_channels_last(m)

    def _prepare(self) -> None:
        o = self.cfg.optim
        kwargs = perf.optimizer_kwargs(self.cfg, self.acc.device)
        self.strategy.before_optimizers(self.acc, {n: self.task.modules[n] for n in self.trained_names})
        opts = {}
        for n in self.trained_names:
            own = {"lr": o.lr, "betas": o.betas, **self.task.optim.get(n, {})}
            params = parallel.trained_parameters(self.task.modules[n])
            opts[n] = torch.optim.AdamW(params, lr=own["lr"], betas=tuple(own["betas"]), weight_decay=o.weight_decay,
                                        **kwargs)
        factor = lr_factor(o.schedule, o.warmup_steps, self.cfg.train.steps)
        scheds = {n: torch.optim.lr_scheduler.LambdaLR(opt, factor) for n, opt in opts.items()}
        self.trained = self.strategy.prepare(self.acc, self.task.modules, opts, scheds)
        self.scheds = {n: t.sched for n, t in self.trained.items()}
        self.modules = {n: t.module for n, t in self.trained.items()}

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all ranks and micro-batches."""
        return self.cfg.data.batch_size * self.cfg.train.grad_accum * self.acc.num_processes

    def _autocast(self, phase: Phase) -> Any:
        return self.strategy.autocast(self.acc) if phase.autocast else nullcontext()

    # ------------------------------------------------------------------------------------------ state

    def resume(self) -> bool:
        t0 = time.perf_counter()
        desc = checkpoint.latest_verified(self.run_dir)
        if desc is None:
            return False
        self.last_checkpoint = desc.path
        changed = checkpoint.version_changes(desc.versions)
        if changed:
            # Shown before anything is loaded, so that a load that fails on a format change is explained.
            dist.print0(f"warning: {desc.path} was written under other versions ({', '.join(changed)}); resuming "
                        f"with this environment's", file=sys.stderr)
            self.tracker.event("versions_changed", checkpoint=str(desc.path), changes=changed)
        checkpoint.load(self.acc, desc)
        self.state.load_state_dict(desc.state["train"])
        self.task.load_state_dict(desc.state.get("task", {}))
        self.feed.load_state_dict(desc.state["data"])
        if self.ema is not None and desc.ema_file is not None:
            self.ema.load(desc.ema_file, desc.state["ema"])
        if self.posthoc is not None and "posthoc" in desc.state:
            self.posthoc.load(desc.path, desc.state["posthoc"]["updates"])
        self.tracker.event("resume", checkpoint=str(desc.path), step=self.state.step,
                           seconds=round(time.perf_counter() - t0, 3))
        return True

    def save(self) -> Path:
        t0 = time.perf_counter()
        files = {}  # consolidated on every rank (collectives), written by the main rank
        if self.ema is not None:
            files[checkpoint.EMA] = self.ema.state_dict()
        if self.posthoc is not None:
            files.update(self.posthoc.files())
        if self.strategy.shards_state:
            files[checkpoint.WEIGHTS] = parallel.full_state_dict(self.modules[self.task.sampled], self.layout)
        for m in self.modules.values():  # what a strategy tells frozen from trained at saving: the LoRA base only
            parallel.set_trainable(m, True)
        best = self.state.best
        state = {"train": self.state.state_dict(), "data": self.feed.state_dict(),
                 "ema": self.ema.meta_state() if self.ema is not None else {"updates": 0},
                 "task": self.task.state_dict()}
        if self.posthoc is not None:
            state["posthoc"] = {"updates": self.posthoc.meta_state()}
        path = self.last_checkpoint = checkpoint.save(
            self.acc, self.run_dir, self.state.step, self.strategy.name, list(self.modules), state, files,
            self.cfg.train.keep_checkpoints, keep_also=checkpoint.step_name(best["step"]) if best else "",
            save_kwargs=self.strategy.save_kwargs)
        self.tracker.event("checkpoint", step=self.state.step, path=str(path),
                           seconds=round(time.perf_counter() - t0, 3))
        return path

    # ------------------------------------------------------------------------------------------ data

    # ------------------------------------------------------------------------------------------ step

    def run_phase(self, index: int, micro: list[dict[str, Any]], step: int) -> dict[str, torch.Tensor]:
        phase = self.task.phases[index]
        self.watchdog.mark(step, f"phase '{phase.name}'")
        trained = self.trained[phase.trains]
        for name, m in self.modules.items():
            parallel.set_trainable(m, name == phase.trains)
        nets = {**self.frozen, **{n: (trained.wrapper if n == phase.trains else m) for n, m in self.modules.items()}}
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.acc.device))
        with trained.double_backward() if phase.double_backward else nullcontext():
            self._micro_steps(phase, index, micro, step, nets, sums)
        self.clock.mark("fwd_bwd")
        norm, stepped = trained.step(self.cfg.optim.grad_clip)
        self.clock.mark("optimizer")
        sums[f"{phase.name}/grad_norm"] = norm.to(self.acc.device)
        if not stepped:
            self.skipped_phases += 1
        return sums

    def _micro_steps(self, phase: Phase, index: int, micro: list[dict[str, Any]], step: int,
                     nets: dict[str, Any], sums: dict[str, torch.Tensor]) -> None:
        trained = self.trained[phase.trains]
        for i, batch in enumerate(micro):
            # Seeded by the micro-batch's place in the global batch, not by rank: 1 process accumulating
            # k micro-batches draws the same noise as k processes with one each.
            global_micro = self.acc.process_index * len(micro) + i
            torch.manual_seed(dist.derive_seed(self.cfg.train.seed, step, index, global_micro))
            with trained.sync(last=i == len(micro) - 1):
                with self._autocast(phase):
                    loss, stats = phase.loss(nets, {**batch, "micro": global_micro}, step)
                trained.backward(loss, len(micro))
            for k, v in stats.items():
                sums[f"{phase.name}/{k}"] += v.float() / len(micro)

    def train_step(self, micro: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        step = self.state.step
        stats: dict[str, torch.Tensor] = {}
        self.skipped_phases = 0
        scheduled = self.task.scheduled(self.state.images, self.global_batch)
        self._set_scheduled(scheduled)
        due = [(i, p) for i, p in enumerate(self.task.phases) if p.due(step)]
        for index, _ in due:
            stats.update(self.run_phase(index, micro, step))
        self.watchdog.mark(step, "the end of the step (schedules, the task's cross-rank update, EMA)")
        self.strategy.end_step(self.modules)
        self._count_nonfinite(step)
        stats["nonfinite_skips"] = torch.tensor(float(self.skipped_phases))
        # A module's schedule counts the steps it trained: one whose phases start later warms up from there.
        for name in dict.fromkeys(p.trains for _, p in due):
            self.scheds[name].step()
        self._set_scheduled(scheduled)  # again: an LR schedule's step (DeepSpeed's inside its own) resets them
        with torch.no_grad():
            stats.update(self.task.after_step({**self.frozen, **self.modules},
                                              lambda t: dist.sum_across_ranks(self.acc, t), step) or {})
        self.clock.mark("collectives")
        if self.ema is not None:
            self.ema.update(scheduled.get("ema_decay"))
        if self.posthoc is not None:
            self.posthoc.update()
        self.clock.mark("ema")
        self.state.step += 1
        self.state.images += self.global_batch
        return stats

    def _set_scheduled(self, scheduled: dict[str, Any]) -> None:
        for name, t in self.trained.items():
            t.set_hyperparameters(scheduled.get(f"lr/{name}"), scheduled.get(f"betas/{name}"))

    def _log_keys(self, micro: list[dict[str, Any]]) -> None:
        """This rank's sample keys of the coming step, one JSON line per step (a resumed run appends)."""
        # A bucket's fill-in repeats (weight 0) are not the step's samples.
        keys = [k for b in micro for i, k in enumerate(b["key"]) if "weight" not in b or b["weight"][i] > 0]
        shape = list(micro[0].get("x", micro[0].get("latent")).shape[-2:])
        line = json.dumps({"step": self.state.step, "keys": keys, "shape": shape})
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

    def _start_event(self, resumed: bool) -> None:
        cfg, acc = self.cfg, self.acc
        self.tracker.begin(self.state.step, resumed)
        params = {n: sum(map(self.strategy.numel, m.parameters())) for n, m in self.modules.items()}
        self.tracker.event(
            "start", task=cfg.task, world_size=acc.num_processes, distributed_type=str(acc.distributed_type),
            backend=str(acc.state.backend), device=str(acc.device), mixed_precision=cfg.train.mixed_precision,
            precision_choice=self.precision_choice,
            step=self.state.step, resumed=resumed, params=params,
            **self.feed.describe(),
            global_batch=self.global_batch, flops_per_image=self.flops_per_image,
            peak_tflops=self.peak_tflops or f"unknown ({self.device_name} is not in gen_dist.perf.PEAK_TFLOPS)",
            compile=self.compiled, channels_last=self.channels_last,
            compiled_blocks={n: len(parallel.blocks(m)) for n, m in self.modules.items()} if self.compiled else {},
            sharding_units={n: self.strategy.sharding_units(m) for n, m in self.modules.items()},
            activation_checkpointing=cfg.train.activation_checkpointing,
            optimizer=perf.optimizer_kwargs(cfg, acc.device))

    def _log(self, window: MetricWindow, progress: Progress) -> None:
        metrics = window.summary(self.global_batch)
        metrics.update(self.clock.take(window.steps))
        metrics.update({f"{k}/{n}": v for n, t in self.trained.items() for k, v in t.hyperparameters().items()})
        bad_count, bad_reports = self.feed.bad.take()
        metrics["data/bad_samples"] = float(bad_count) * self.acc.num_processes  # the mean becomes the sum
        metrics = dist.mean_across_ranks(self.acc, metrics)
        metrics.update(dist.max_across_ranks(self.acc, perf.peak_memory(self.acc.device)))
        metrics.update(self._utilisation(metrics["images_per_s"]))
        metrics.update(self.feed.metrics(), images_seen=self.state.images)
        if metrics["data/bad_samples"]:
            for rank, reports in enumerate(dist.all_objects(self.acc, bad_reports)):
                if reports:
                    self.tracker.event("bad_data", step=self.state.step, rank=rank, samples=reports[:20])
        self.tracker.log(self.state.step, metrics)
        progress.record(self.state.step, metrics)
        window.reset()

    def _utilisation(self, images_per_s: float) -> dict[str, float]:
        """Model TFLOP/s per device, and MFU where the device's peak is known."""
        tflops = self.flops_per_image * images_per_s / self.acc.num_processes / 1e12
        out = {"perf/tflops_per_device": tflops}
        if self.peak_tflops:
            out["perf/mfu"] = tflops / self.peak_tflops
        return out

    def train(self) -> TrainState:
        t = self.cfg.train
        resumed = self.resume()
        self._start_event(resumed)
        saved_at = self.state.step if resumed else -1
        progress = Progress(t.steps, self.state.step, t.progress)
        stop = dist.StopRequest()
        try:
            signum, saved_at = self._loop(progress, saved_at, stop)
        except Exception as e:
            self._fail(e)
            raise
        finally:
            stop.restore()
            progress.close()
            self.watchdog.close()
        if signum:
            self._stop(signum, saved=saved_at == self.state.step)
        elif self.supervised_stop:
            self._halt(saved_at == self.state.step, self.supervisor.status)
        else:
            self._finish(saved_at)
        return self.state

    def _loop(self, progress: Progress, saved_at: int, stop: dist.StopRequest) -> tuple[int, int]:
        """Steps until train.steps or until all ranks agree to stop; returns (the stop signal or 0, the step of
        the last checkpoint written)."""
        t = self.cfg.train
        batches = self.feed.steps(self.state.step, t.grad_accum, self.channels_last)
        window = MetricWindow()
        mark = self.watchdog.mark
        while self.state.step < t.steps:
            t0 = time.perf_counter()
            self.clock.start()
            mark(self.state.step, "reading data")
            micro = next(batches)
            t1 = time.perf_counter()
            self.clock.mark("data")
            if t.log_keys:
                self._log_keys(micro)
            stats = self.train_step(micro)
            if "weight" in micro[0]:
                stats["data/padding"] = torch.cat([b["weight"] == 0 for b in micro]).float().mean()
            step = self.state.step
            mark(step, "the stop-signal agreement")
            signum = stop.agreed(self.acc)
            self.clock.mark("collectives")
            window.add(stats, wait=t1 - t0, elapsed=time.perf_counter() - t0)
            progress.update()
            if step % t.log_every == 0 or step == t.steps:
                mark(step, "logging")
                self._log(window, progress)
            if t.sample_every and step % t.sample_every == 0 and step < t.steps and self.task.generates:
                mark(step, "a sample grid")
                self.write_samples()
            best = False
            if self.cfg.eval.every and (step % self.cfg.eval.every == 0 or step == t.steps):
                mark(step, "evaluation")
                scores = self.evaluate()
                best = bool(t.keep_best) and self.better(scores)
                self.supervised_stop = self.supervisor is not None and self._supervisor_stops(scores)
            if t.snapshot_every and step % t.snapshot_every == 0:
                mark(step, "a snapshot")
                self.write_snapshot()
            if self.posthoc is not None and step % t.posthoc_every == 0:
                mark(step, "a post-hoc EMA snapshot")
                self.posthoc.write(posthoc.snapshot_path(self.run_dir, step), step, self.task.sampled,
                                   self.task.state_dict(), dist.is_main())
            if step % t.ckpt_every == 0 or best:
                mark(step, "a checkpoint")
                self.save()
                saved_at = step
            if best:
                self.write_best()
            if signum or self.supervised_stop:
                return signum, saved_at
        return 0, saved_at

    def _fail(self, error: Exception) -> None:
        """Every rank says where it was when the loop failed (a timed-out collective names its step and phase)."""
        message = self.watchdog.failure(error)
        print(f"gen_dist: {message}", file=sys.stderr, flush=True)
        self.tracker.event("failed", step=self.state.step, where=self.watchdog.where, error=str(error)[:500])
        self.tracker.close("failed")

    def _finish(self, saved_at: int) -> None:
        if saved_at != self.state.step:
            self.save()
        if self.task.generates:
            self.write_samples()
        self.tracker.event("end", step=self.state.step)
        self.tracker.close("ended")

    def _supervisor_stops(self, scores: dict[str, float]) -> bool:
        """The supervisor asked once, by the main rank, after this evaluation; every rank takes its answer."""
        flag = float(self.supervisor.should_stop(self.state.step, scores)) if dist.is_main() else 0.0
        return dist.max_across_ranks(self.acc, {"stop": flag})["stop"] > 0

    def _stop(self, signum: int, saved: bool) -> None:
        """Every rank agreed to stop after this step: one checkpoint, and a marker telling a job script to
        requeue (the restarted run resumes from the checkpoint by itself)."""
        name = signal.Signals(signum).name
        self._halt(saved, "preempted", signal=name)
        self.stopped = name

    def _halt(self, saved: bool, status: str, **fields: str) -> None:
        """Ends the run before train.steps: the last checkpoint (written now unless this step has one), a marker
        file in the run directory naming it (`<status>.json`), and the tracker closed with that status."""
        path = self.last_checkpoint if saved else self.save()
        record = {"step": self.state.step, **fields, "checkpoint": str(path)}
        if dist.is_main():
            write_atomic(self.run_dir / halt_marker(status), json.dumps(record))
        self.tracker.event(status, **record)
        self.tracker.close(status)
