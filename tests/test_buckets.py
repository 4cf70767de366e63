"""Aspect-ratio buckets and weighted mixtures: the tables, the epoch plan (the same on any ranks and workers, each
sample once, over local disk and S3), resume on another layout, a mixture's plan and proportions, the errors before
launch, and bucketed, mixed text-to-image training in real processes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import ROOT, events, kill_tree, records, run_cli, train_command
from PIL import Image

from gen_dist import checkpoint
from gen_dist.config import load_config
from gen_dist.data import DataError, Segment, image_sizes, index_source, open_catalog
from gen_dist.data.bucketed import BucketStream
from gen_dist.data.buckets import SDXL_1024, assign, bucket_table
from gen_dist.schema import ConfigError

# (width, height): tall, wide and square images in uneven numbers.
SIZES = [(24, 40), (40, 24), (32, 32), (30, 33), (50, 28), (26, 44), (36, 36)]
TABLE = ("ladder", 16, 4, 2.0)  # (height, width) (12, 20), (16, 16), (20, 12)


def write_img2dataset(root: Path, shards: int, per_shard: int, seed: int = 0, prefix: str = "") -> set[str]:
    """Shards as img2dataset writes them (NNNNN.tar of jpg + txt + json, NNNNN_stats.json), images of SIZES;
    returns the keys."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    keys = set()
    for s in range(shards):
        with wds.TarWriter(str(root / f"{s:05d}.tar"), encoder=False) as tar:
            for i in range(per_shard):
                w, h = SIZES[int(rng.integers(len(SIZES)))]
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
                key = f"{prefix}{s:05d}{i:04d}"
                meta = {"caption": f"image {key}", "width": w, "height": h, "label": i % 3}
                tar.write({"__key__": key, "jpg": buf.getvalue(), "txt": meta["caption"].encode(),
                           "json": json.dumps(meta).encode()})
                keys.add(key)
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"successes": per_shard}))
    return keys


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, set[str]]:
    root = tmp_path_factory.mktemp("bucketed") / "set"
    keys = write_img2dataset(root, shards=8, per_shard=20)
    index = root.parent / "set.json"
    index_source(str(root), index)
    return root, index, keys


def stream(root: Path, index: Path, rank: int, world: int, workers: int, batch: int, accum: int = 1,
           **kw) -> BucketStream:
    catalog = open_catalog(str(root), index=str(index))
    table = bucket_table(*TABLE)
    return BucketStream(assign(image_sizes(catalog, str(index)), table), table, accum, source=catalog, split="",
                        batch_size=batch, rank=rank, world_size=world, num_workers=workers, seed=3, shuffle_buffer=0,
                        resolution=16, channels=3, hflip=False, **kw)


def read(root: Path, index: Path, world: int, workers: int, batch: int, accum: int = 1, epoch: int = 0,
         start: int = 0, done: tuple[Segment, ...] = (), stop: int | None = None) -> list[list[dict]]:
    """[rank] -> its micro-batches, through DataLoader workers."""
    from torch.utils.data import DataLoader

    out = []
    for rank in range(world):
        ds = stream(root, index, rank, world, workers, batch, accum)
        ds.set_position(epoch, start, done)
        got = []
        for b in DataLoader(ds, batch_size=None, num_workers=workers):
            if stop is not None and start + len(got) == stop:
                break
            got.append(b)
        assert stop is not None or len(got) == ds.batches_per_epoch
        out.append(got)
    return out


def steps_of(parts: list[list[dict]], accum: int) -> list[tuple[tuple[int, int], int, float]]:
    """Per step: (its bucket's (height, width), real samples in the global batch, summed weight / global batch)."""
    n = len(parts[0]) // accum
    assert all(len(p) == len(parts[0]) for p in parts), "ranks took different numbers of steps"
    out = []
    for s in range(n):
        micro = [b for p in parts for b in p[s * accum:(s + 1) * accum]]
        shapes = {tuple(b["image"].shape[-2:]) for b in micro}
        assert len(shapes) == 1, f"step {s}: ranks in different buckets {shapes}"
        weights = np.concatenate([b["weight"].numpy() for b in micro])
        out.append((shapes.pop(), int((weights > 0).sum()), float(weights.sum() / len(weights))))
    return out


def real_keys(parts: list[list[dict]]) -> list[str]:
    return [k for p in parts for b in p for k, w in zip(b["key"], b["weight"].tolist(), strict=True) if w > 0]


def test_tables() -> None:
    sdxl = bucket_table("sdxl", 1024)
    assert len(sdxl) == len(SDXL_1024) == 41 and (1024, 1024) in sdxl
    assert all(h % 64 == 0 and w % 64 == 0 and 0.9 * 1024**2 <= h * w <= 1.05 * 1024**2 for h, w in sdxl), sdxl
    assert bucket_table("pixart", 512)[0] == (256, 1024)  # PixArt's table as diffusers ships it
    assert bucket_table(*TABLE) == [(12, 20), (16, 16), (20, 12)]  # by h / w
    ladder = bucket_table("ladder", 512, 64, 4.0)
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 512**2 and max(h / w, w / h) <= 4 for h, w in ladder)
    assert assign(np.array([[24, 40], [40, 24], [32, 31], [0, 0]]), bucket_table(*TABLE)).tolist() == [2, 0, 1, 1]
    for args, match in [(("cubes", 512), "unknown table 'cubes'"), (("sdxl", 512), "SDXL's table at 1024"),
                        (("pixart", 300), "256, 512, 1024 and 2048"), (("ladder", 100, 64), "must divide")]:
        with pytest.raises(DataError, match=match):
            bucket_table(*args)


# (ranks, workers, per-rank batch, micro-batches per step): all with a global batch of 8.
LAYOUTS = [(1, 0, 8, 1), (1, 2, 4, 2), (2, 1, 4, 1), (2, 2, 2, 2), (4, 2, 2, 1), (4, 0, 1, 2)]


def test_plan_is_one_on_any_layout_and_each_sample_once(shards: tuple[Path, Path, set[str]]) -> None:
    """The same buckets and real counts step by step for 1, 2 and 4 ranks, 0, 1 and 2 workers and grad
    accumulation; every sample once per epoch with weight; the weights average the real samples."""
    root, index, keys = shards
    plans = []
    for world, workers, batch, accum in LAYOUTS:
        parts = read(root, index, world, workers, batch, accum)
        plans.append(steps_of(parts, accum))
        got = real_keys(parts)
        assert len(got) == len(keys) and set(got) == keys, (world, workers)
    assert all(p == plans[0] for p in plans), "the plan changed with the layout"
    assert {shape for shape, _, _ in plans[0]} == {(20, 12), (16, 16), (12, 20)}
    assert all(abs(mean - 1) < 1e-6 for _, _, mean in plans[0])  # each step's loss: the mean over its real samples
    assert sum(real for _, real, _ in plans[0]) == len(keys)
    assert steps_of(read(root, index, 2, 1, 4, epoch=1), 1) != plans[0]


@pytest.mark.parametrize(("first", "second"), [((2, 2, 4, 1), (4, 1, 2, 1)), ((4, 2, 2, 1), (1, 0, 4, 2)),
                                               ((1, 2, 4, 2), (2, 1, 2, 2))])
def test_resume_on_another_layout_continues_the_plan(shards: tuple[Path, Path, set[str]], first: tuple,
                                                     second: tuple) -> None:
    """Stopped after 5 steps and resumed on other ranks and workers: the rest of the plan is the same, and the
    epoch reads every sample once."""
    from gen_dist.data import ReadLayout

    root, index, keys = shards
    whole = steps_of(read(root, index, *first), first[3])
    stop = 5 * first[3]
    head = read(root, index, *first, stop=stop)
    done = (Segment(ReadLayout(first[0], max(1, first[1]), first[2], 0, first[3]), stop),)
    tail = read(root, index, *second, done=done)
    assert steps_of(head, first[3]) + steps_of(tail, second[3]) == whole
    got = real_keys(head) + real_keys(tail)
    assert len(got) == len(keys) and set(got) == keys


def test_another_global_batch_mid_epoch_is_refused(shards: tuple[Path, Path, set[str]]) -> None:
    from gen_dist.data import ReadLayout

    root, index, _ = shards
    ds = stream(root, index, 0, 2, 1, 4)
    with pytest.raises(DataError, match="global batch it was planned for"):
        ds.set_position(0, 0, (Segment(ReadLayout(2, 1, 8, 0, 1), 4),))


def test_geometry_travels_with_the_sample(shards: tuple[Path, Path, set[str]]) -> None:
    """Each image's original size and the offsets of its center crop in the image resized to cover its bucket."""
    root, index, _ = shards
    cropped = 0
    for batch in read(root, index, 1, 0, 8)[0]:
        th, tw = batch["image"].shape[-2:]
        assert (th, tw) in bucket_table(*TABLE)
        for h, w, top, left in batch["geometry"].tolist():
            assert (w, h) in SIZES
            scale = max(th / h, tw / w)
            assert (top, left) == ((max(th, round(h * scale)) - th) // 2, (max(tw, round(w * scale)) - tw) // 2)
            cropped += top + left > 0
    assert cropped


def cfg_with(tmp_path: Path, *overrides: str):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", "task=diffusion", *overrides])


def test_bad_bucket_configs_fail_before_launch(tmp_path: Path, shards: tuple[Path, Path, set[str]]) -> None:
    from gen_dist.preflight import preflight, training_catalogs

    root, index, _ = shards
    for overrides, match in [
        (["data.buckets=cubes"], "unknown table 'cubes'"),
        (["data.buckets=sdxl", "data.resolution=512"], "SDXL's table at 1024"),
        (["data.buckets=ladder", "data.resolution=32", "data.bucket_multiple=4",
          "diffusion.channels=[8,8,8,8]", "diffusion.attention=[false,false,false,false]"],
         r"bucket \d+x\d+ of data.buckets=ladder must be divisible by 8 for 4 UNet levels"),
        (["task=gan", "data.buckets=ladder"], "trains diffusion models"),
        (["data.buckets=ladder", "data.latents=x"], "cannot be bucketed"),
    ]:
        with pytest.raises(ConfigError, match=match):
            cfg_with(tmp_path, *overrides)
    cfg = cfg_with(tmp_path, f"data.path={root}", "data.buckets=ladder", "data.resolution=16", "data.bucket_multiple=4",
                   "data.channels=3", "diffusion.channels=[8,8]", "diffusion.attention=[false,false]",
                   "diffusion.num_classes=0", "data.batch_size=4")
    with pytest.raises(DataError, match="needs each image's size: index the source once with `gen-dist data index"):
        preflight(cfg, 2, training_catalogs(cfg))
    cfg.data.index = str(index)
    preflight(cfg, 2, training_catalogs(cfg))


def test_missing_label_member_is_refused_before_launch(tmp_path: Path, shards: tuple[Path, Path, set[str]]) -> None:
    """img2dataset's shards carry no cls member: a class-conditional config says which member it looked for."""
    from gen_dist.preflight import preflight, training_catalogs

    root, index, _ = shards
    cfg = cfg_with(tmp_path, f"data.path={root}", "data.channels=3", "data.resolution=16",
                   "diffusion.channels=[8,8]", "diffusion.attention=[false,false]", "diffusion.num_classes=3")
    with pytest.raises(ConfigError, match=r"no data.label_key 'cls' \(its members: jpg, json, txt; its json's "
                                          r"fields: caption, height, label, width\).*num_classes=0"):
        preflight(cfg, 1, training_catalogs(cfg))
    cfg.data.label_key = "json:label"
    preflight(cfg, 1, training_catalogs(cfg))


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_a_mixture_draws_by_weight_from_a_plan_of_the_step_alone() -> None:
    from gen_dist.data.mixture import source_at

    weights = np.array([3.0, 1.0, 0.0])
    drawn = np.bincount([source_at(5, k, weights) for k in range(20000)], minlength=3) / 20000
    assert np.abs(drawn - [0.75, 0.25, 0.0]).max() < 0.02  # 4.6 standard deviations of 20000 draws
    assert [source_at(5, k, weights) for k in range(100, 120)] == [source_at(5, k, weights) for k in range(100, 120)]
    assert [source_at(6, k, weights) for k in range(50)] != [source_at(5, k, weights) for k in range(50)]


def test_bad_mixtures_fail_before_launch(tmp_path: Path, shards: tuple[Path, Path, set[str]]) -> None:
    from gen_dist.preflight import preflight, training_catalogs

    for sources, match in [("[{path: a, weight: -1}, {path: b}]", "weights must be >= 0"),
                           ("[{path: a, weight: 0}, {path: b, weight: 0}]", "not all 0"),
                           ("[{path: x/a}, {path: y/a}]", "names .* repeat"),
                           ("[{weight: 1}]", "needs a path")]:
        with pytest.raises(ConfigError, match=match):
            cfg_with(tmp_path, f"data.sources={sources}")
    root, index, _ = shards
    cfg = cfg_with(tmp_path, f"data.sources=[{{path: {root}, caption_key: txt}}, {{path: {root}, name: other, "
                             f"caption_key: caption}}]", "data.channels=3", "data.resolution=16",
                   "diffusion.channels=[8,8]", "diffusion.attention=[false,false]", "diffusion.num_classes=0")
    with pytest.raises(ConfigError, match=r"no caption \(data.caption_key 'caption'\)"):
        preflight(cfg, 1, training_catalogs(cfg))


def test_s3_bucketed_epoch_is_the_local_plan_each_sample_once(tmp_path: Path, shards: tuple[Path, Path, set[str]],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from storage import S3Server

    root, index, keys = shards
    with S3Server(tmp_path / "s3") as s3:
        s3.upload("data", "set", sorted(root.glob("*.tar")))
        for k, v in s3.env.items():
            monkeypatch.setenv(k, v)
        remote_index = tmp_path / "s3.json"
        index_source("s3://data/set/", remote_index)
        parts = read("s3://data/set/", remote_index, 2, 2, 4)
        got = real_keys(parts)
        assert len(got) == len(keys) and set(got) == keys
        assert steps_of(parts, 1) == steps_of(read(root, index, 2, 2, 4), 1)


def test_bucketed_mixture_under_fsdp_trains_by_plan_and_resumes_on_another_world_size(
        tmp_path: Path, shards: tuple[Path, Path, set[str]], text_encoder: Path) -> None:
    """Two bucketed sources, weights 3 : 1, on 2 ranks under FSDP2, killed (-9) after its checkpoint at step 5;
    1 rank resumes with the same global batch to step 24: each step all of the source the mixture's plan names
    and in the bucket that source's epoch plan names; each source read once per its own epoch; padding,
    per-source samples and epochs logged."""
    from gen_dist.data.mixture import source_at

    big, big_index, big_keys = shards
    small = tmp_path / "small"
    small_keys = write_img2dataset(small, shards=4, per_shard=10, seed=1, prefix="s")
    small_index = tmp_path / "small.json"
    index_source(str(small), small_index)
    run = tmp_path / "run"
    common = [str(CONFIGS / "smoke_diffusion_text.yaml"), f"run_dir={run}",
              f"data.sources=[{{path: {small}, index: {small_index}, weight: 3}}, "
              f"{{path: {big}, index: {big_index}, weight: 1, name: big}}]",
              "data.buckets=ladder", "data.resolution=16", "data.bucket_multiple=4", "data.bucket_max_ratio=2",
              "data.channels=3", "data.caption_key=txt", "data.caption_templates=[]", "data.class_names=[]",
              f"diffusion.text_encoder=[{text_encoder}]", "train.log_keys=true", "train.log_every=1",
              "parallel.strategy=fsdp", "train.ema_decay=0", "train.sample_n=4", "diffusion.num_classes=0",
              "train.seed=3"]  # the seed stream() plans with
    first = subprocess.Popen([sys.executable, "-m", "gen_dist", *train_command(
        2, *common, "data.batch_size=4", "train.steps=24", "train.ckpt_every=5")], cwd=ROOT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    log = run / "metrics.jsonl"
    while first.poll() is None and time.monotonic() < deadline and (
            log.read_text().count('"denoise/loss"') if log.exists() else 0) < 7:
        time.sleep(0.05)
    assert first.poll() is None, "the run ended before it could be killed"
    kill_tree(first)
    saved = checkpoint.latest(run)
    assert saved is not None and 5 <= int(saved.name.split("_")[1]) < 24
    resumed_at = int(saved.name.split("_")[1])
    run_cli(*train_command(1, *common, "data.batch_size=8", "train.steps=24", "train.ckpt_every=100"))
    by_step: dict[int, dict] = {}
    for f in sorted(run.glob("keys_rank*.jsonl")):
        rank = int(f.stem.removeprefix("keys_rank"))
        per_step: dict[int, dict] = {}
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by the kill
                continue
            if rank == 0 or rec["step"] < resumed_at:  # the killed run's later steps were trained again
                per_step[rec["step"]] = rec  # the last record of a step wins
        for step, rec in per_step.items():
            by_step.setdefault(step, {"keys": [], "shape": rec["shape"]})["keys"] += rec["keys"]
    assert sorted(by_step) == list(range(24))
    plans = {"small": [stream(small, small_index, 0, 1, 0, 8).plan_of(e) for e in range(4)],
             "big": [stream(big, big_index, 0, 1, 0, 8).plan_of(0)]}
    trained: dict[str, list[str]] = {"small": [], "big": []}
    taken = {"small": 0, "big": 0}
    table = bucket_table(*TABLE)
    for step, rec in sorted(by_step.items()):
        source = ["small", "big"][source_at(3, step, np.array([3.0, 1.0]))]
        assert {k.startswith("s") for k in rec["keys"]} == {source == "small"}, step
        k, epoch = taken[source], 0
        while k >= plans[source][epoch].steps:
            k, epoch = k - plans[source][epoch].steps, epoch + 1
        assert rec["shape"] == list(table[plans[source][epoch].bucket[k]]), (step, source)
        taken[source] += 1
        trained[source] += rec["keys"]
    epoch = len(small_keys)
    assert len(trained["small"]) > 2 * epoch  # the small source repeats: each of its epochs once
    for e in range(len(trained["small"]) // epoch):
        assert sorted(trained["small"][e * epoch:(e + 1) * epoch]) == sorted(small_keys)
    assert len(set(trained["big"])) == len(trained["big"]) and set(trained["big"]) <= big_keys
    steps = [r for r in records(run) if "denoise/loss" in r]
    assert all(np.isfinite(r["denoise/loss"]) for r in steps) and max(r["data/padding"] for r in steps) > 0
    last = steps[-1]
    assert last["data/small/samples"] + last["data/big/samples"] == 24 * 8 and last["data/small/epoch"] >= 2
    resumed = [e for e in events(run, "data_plan") if e["from_step"] > 0]
    assert resumed and all(e["source"] in ("small", "big") for e in resumed)


@pytest.mark.parametrize("name", ["finetune_sdxl_buckets.yaml", "finetune_sd15_mixture.yaml"])
def test_shipped_bucket_and_mixture_data_sections_are_valid(name: str, tmp_path: Path) -> None:
    """Their pipelines are downloaded first; their data sections are checked on the smoke model."""
    from gen_dist.parsing import read_yaml

    data = read_yaml((CONFIGS / name).read_text())["data"]
    cfg = cfg_with(tmp_path, *(f"data.{k}={json.dumps(v)}" for k, v in data.items()), "diffusion.channels=[8,8]",
                   "diffusion.attention=[false,false]")
    assert cfg.data.buckets and (cfg.data.sources or cfg.data.index)


def test_sdxl_micro_conditioning_takes_each_samples_geometry() -> None:
    """(original height, width, crop top, left) from the stream, the target the bucket's size in pixels."""
    import torch

    from gen_dist.pipelines.sdxl import time_ids

    x = torch.zeros(2, 4, 12, 20)
    geometry = torch.tensor([[400, 240, 2, 0], [330, 300, 0, 11]])
    assert time_ids(x, 8, geometry).tolist() == [[400, 240, 2, 0, 96, 160], [330, 300, 0, 11, 96, 160]]
    assert time_ids(x, 8).tolist()[0] == [96, 160, 0, 0, 96, 160]
