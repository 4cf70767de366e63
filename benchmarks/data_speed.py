"""Images/s of one loader worker decoding and cropping the same JPEG shards from local disk, over HTTP (Python's
server) and from S3 (SeaweedFS), with gen_dist's reader and with a plain webdataset pipeline doing the same
work; the cost of JPEG decoding with and without decode-time downscaling; with --buckets, the same shards read
in aspect-ratio buckets and as a 3:1 mixture of two sources in buckets, against the plain stream (images/s, the
padding share, the most samples a reader holds); and, with --train, the data wait of a 2-rank training run of the
demo config reading Fashion-MNIST's shards from the S3 server.

    python benchmarks/data_speed.py [--shards 8 --per-shard 250 --size 256 --resolution 64] [--buckets] [--train]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from storage import HTTPServer, S3Server  # noqa: E402

from gen_dist.data import Fields, ShardStream, decode_image, index_source, open_catalog  # noqa: E402


def write_shards(out: Path, shards: int, per_shard: int, size: int) -> list[Path]:
    """Photographs are smooth with some texture: a gradient plus noise, about 15-25 KB as JPEG at 256 px."""
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        path = out / f"{s:05d}.tar"
        with wds.TarWriter(str(path), encoder=False) as w:
            for i in range(per_shard):
                h, wd = size, int(size * rng.uniform(1.0, 1.5))
                y, x = np.mgrid[0:h, 0:wd]
                base = np.stack([x * 255 / wd, y * 255 / h, (x + y) * 127 / (h + wd)], -1)
                img = np.clip(base + rng.normal(0, 12, (h, wd, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=90)
                w.write({"__key__": f"{s:05d}{i:05d}", "jpg": buf.getvalue(), "cls": str(i % 10).encode()})
        paths.append(path)
    return paths


def gen_dist_rate(source: str, index: str, resolution: int, total: int) -> float:
    catalog = open_catalog(source, index=index)
    stream = ShardStream(catalog, "train", 50, 0, 1, 0, 0, 1, resolution, 3, False,
                         fields=Fields(3, resolution, label="cls"))
    t0 = time.perf_counter()
    n = sum(len(b["key"]) for b in stream)
    assert n == total, (n, total)
    return n / (time.perf_counter() - t0)


def bucket_rates(work: Path, paths: list[Path], resolution: int, total: int) -> None:
    """Plain, bucketed and bucketed-and-mixed reading of the same shards by one reader, in one process."""
    from gen_dist.data import image_sizes
    from gen_dist.data.bucketed import BucketStream
    from gen_dist.data.buckets import assign, bucket_table
    from gen_dist.data.mixture import source_at

    table = bucket_table("ladder", resolution, 16, 2.0)
    fields = Fields(3, resolution, label="cls")

    def streams(parts: list[list[Path]], bucketed: bool) -> list:
        out = []
        for i, part in enumerate(parts):
            source, index = "::".join(map(str, part)), work / f"part{len(parts)}_{i}.json"
            index_source(source, index)
            catalog = open_catalog(source, index=str(index))
            common = dict(source=catalog, split="train", batch_size=50, rank=0, world_size=1, num_workers=0, seed=0,
                          shuffle_buffer=1, resolution=resolution, channels=3, hflip=False, fields=fields)
            out.append(BucketStream(assign(image_sizes(catalog, str(index)), table), table, 1, **common)
                       if bucketed else ShardStream(**common))
        return out

    def rate(parts: list[list[Path]], bucketed: bool) -> tuple[float, float, int]:
        made = streams(parts, bucketed)
        feeds, n, real, places = [iter(s) for s in made], 0, 0, 0
        weights = np.array([3.0, 1.0][: len(made)])
        t0 = time.perf_counter()
        for step in range(10**9):
            i = source_at(0, step, weights) if len(made) > 1 else 0
            batch = next(feeds[i], None)
            if batch is None:  # the first source's epoch is over: as many images as one epoch of the set
                break
            n += len(batch["key"])
            w = batch.get("weight")
            real += int((w > 0).sum()) if w is not None else len(batch["key"])
            places += len(batch["key"])
        held = max(getattr(s, "held_at_most", 0) for s in made)
        return real / (time.perf_counter() - t0), 1 - real / places, held

    half = len(paths) // 2
    rows = [("plain", *rate([paths], False)), ("buckets", *rate([paths], True)),
            ("buckets + 3:1 mixture", *rate([paths[:half], paths[half:]], True))]
    plain = rows[0][1]
    print(f"{total} JPEGs read by one reader, {len(table)} ladder buckets at {resolution} px, batch 50")
    print(f"{'stream':<24} {'img/s':>8} {'vs plain':>9} {'padding':>8} {'most held':>10}")
    for name, r, pad, held in rows:
        print(f"{name:<24} {r:>8.1f} {r / plain:>8.2f}x {pad:>8.1%} {held:>10}")


def train_in_buckets(work: Path, steps: int) -> None:
    """The demo config's model on 2 ranks at 32 px, on the synthetic JPEGs as square crops and in a ladder of
    buckets: images/s and the share of the step spent waiting for data."""
    root = Path(__file__).resolve().parents[1]
    paths = write_shards(work / "train_shards", 8, 500, 128)
    index = work / "train.json"
    index_source(str(work / "train_shards"), index)
    common = ["configs/diffusion_fashion_mnist.yaml", f"data.path={work / 'train_shards'}", f"data.index={index}",
              "data.channels=3", "data.resolution=32", "diffusion.num_classes=10", "eval.every=0"]
    buckets = ["data.buckets=ladder", "data.bucket_multiple=8", "data.bucket_max_ratio=2"]
    for name, extra in (("square crops", []), ("ladder buckets", buckets)):
        out = subprocess.run([sys.executable, str(root / "benchmarks" / "throughput.py"), *common, *extra, "--nproc",
                              "2", "--steps", str(steps)], check=True, cwd=root, capture_output=True, text=True).stdout
        print(f"{len(paths) * 500} JPEGs, 2 ranks, demo model at 32 px, {name}:\n{out}")


def webdataset_rate(urls: list[str], resolution: int, total: int) -> float:
    """The same work in webdataset's idiom: decode to PIL, shorter side to the resolution, center crop."""

    def crop(img: Image.Image) -> np.ndarray:
        w, h = img.size
        scale = resolution / min(w, h)
        w, h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        img = img.convert("RGB").resize((w, h), Image.BICUBIC)
        left, top = (w - resolution) // 2, (h - resolution) // 2
        return np.asarray(img.crop((left, top, left + resolution, top + resolution))).transpose(2, 0, 1)

    pipeline = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls").map_tuple(crop, int)
    t0 = time.perf_counter()
    n = sum(1 for _ in pipeline)
    assert n == total, (n, total)
    return n / (time.perf_counter() - t0)


def decode_cost(path: Path, resolution: int, n: int = 200) -> tuple[float, float]:
    """ms per image to decode, resize and crop, with JPEG draft mode (decode-time downscaling) and without."""
    samples = [s for _, s in zip(range(n), wds.WebDataset(str(path), shardshuffle=False), strict=False)]
    fields = Fields(3, resolution)
    t0 = time.perf_counter()
    for s in samples:
        decode_image(s, fields)
    with_draft = (time.perf_counter() - t0) / len(samples) * 1000
    t0 = time.perf_counter()
    for s in samples:  # the same steps without draft: PIL decodes every pixel
        img = Image.open(io.BytesIO(s["jpg"])).convert("RGB")
        w, h = img.size
        scale = resolution / min(w, h)
        img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
        np.asarray(img)
    without = (time.perf_counter() - t0) / len(samples) * 1000
    return with_draft, without


def train_from_s3(work: Path) -> None:
    """The demo config on 2 ranks, its train shards read from the S3 server: images/s and the data wait."""
    root = Path(__file__).resolve().parents[1]
    data = root / "data" / "fashion_mnist"
    train = sorted(data.glob("train-*.tar"))
    with S3Server(work / "s3_train") as s3:
        s3.upload("fmnist", "fashion_mnist", train)
        env = {**os.environ, **s3.env}
        pattern = f"s3://fmnist/fashion_mnist/train-{{000000..{len(train) - 1:06d}}}.tar"
        subprocess.run([sys.executable, "-m", "gen_dist", "data", "index", pattern, "--out",
                        str(work / "fm.json")], check=True, env=env, cwd=root)
        out = subprocess.run([sys.executable, str(root / "benchmarks" / "throughput.py"),
                              "configs/diffusion_fashion_mnist.yaml", f"data.path={pattern}",
                              f"data.index={work / 'fm.json'}", "--nproc", "2", "--steps", "200"],
                             check=True, env=env, cwd=root, capture_output=True, text=True).stdout
        print("2 ranks, demo config, train shards from S3:\n" + out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=250)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--train", action="store_true", help="also the 2-rank training run from S3")
    p.add_argument("--buckets", action="store_true", help="also bucketed and mixed reading")
    p.add_argument("--buckets-only", action="store_true")
    p.add_argument("--train-buckets", type=int, default=0, metavar="STEPS",
                   help="only the 2-rank training run, square and in buckets, for STEPS steps")
    p.add_argument("--train-only", action="store_true")
    args = p.parse_args()
    if args.train_buckets:
        with tempfile.TemporaryDirectory() as tmp:
            train_in_buckets(Path(tmp), args.train_buckets)
        return
    if args.buckets_only:
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_shards(Path(tmp) / "shards", args.shards, args.per_shard, args.size)
            bucket_rates(Path(tmp), paths, args.resolution, args.shards * args.per_shard)
        return
    if args.train_only:
        with tempfile.TemporaryDirectory() as tmp:
            train_from_s3(Path(tmp))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = write_shards(work / "shards", args.shards, args.per_shard, args.size)
        total = args.shards * args.per_shard
        index = work / "index.json"
        index_source(str(work / "shards"), index)
        rows = []
        local = [str(p) for p in paths]
        rows.append(("local", gen_dist_rate(str(work / "shards"), str(index), args.resolution, total),
                     webdataset_rate(local, args.resolution, total)))
        with HTTPServer(work / "shards") as http:
            pattern = f"{http.url}/{{00000..{args.shards - 1:05d}}}.tar"
            http_index = work / "http.json"
            index_source(pattern, http_index)
            urls = [f"{http.url}/{p.name}" for p in paths]
            rows.append(("http", gen_dist_rate(pattern, str(http_index), args.resolution, total),
                         webdataset_rate(urls, args.resolution, total)))
        with S3Server(work / "s3") as s3:
            s3.upload("bench", "jpeg", paths)
            os.environ.update(s3.env)
            s3_index = work / "s3.json"
            index_source("s3://bench/jpeg/", s3_index)
            rows.append(("s3", gen_dist_rate("s3://bench/jpeg/", str(s3_index), args.resolution, total), None))
        print(f"{total} JPEGs ({args.size} px tall, 1-1.5x as wide) -> {args.resolution} px crops, one worker")
        print(f"{'source':<8} {'gen_dist img/s':>15} {'webdataset img/s':>17} {'ratio':>6}")
        for name, ours, theirs in rows:
            ratio = f"{ours / theirs:.2f}" if theirs else "-"
            print(f"{name:<8} {ours:>15.1f} {(f'{theirs:.1f}' if theirs else '- (no S3 reader)'):>17} {ratio:>6}")
        with_draft, without = decode_cost(paths[0], args.resolution)
        print(f"decode+resize per image: {with_draft:.2f} ms with JPEG draft (decode-time downscaling), "
              f"{without:.2f} ms without ({without / with_draft:.2f}x)")
        print(json.dumps({"rows": rows, "draft_ms": with_draft, "full_ms": without}))
        if args.buckets:
            bucket_rates(work, paths, args.resolution, total)
        if args.train:
            train_from_s3(work)


if __name__ == "__main__":
    main()
