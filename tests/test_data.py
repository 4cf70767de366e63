import gzip
import io
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gen_dist.data import (
    DataError,
    Piece,
    ReadLayout,
    Segment,
    ShardStream,
    batch_sizes,
    load_index,
    pack_idx_dir,
    pack_image_folder,
    read_pieces,
    write_shards,
)
from gen_dist.data.pack import update_index
from gen_dist.data.stream import epoch_shards, to_pieces


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def png_array(raw: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(raw)))


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def all_samples(root: Path, split: str) -> list[dict]:
    entry = load_index(root)["splits"][split]
    return list(read_pieces([Piece(str(root / s["file"]), 0, s["count"]) for s in entry["shards"]]))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (53, 9, 7), dtype=np.uint8)
    labels = rng.integers(0, 4, 53).astype(np.uint8)
    src = tmp_path / "src"
    src.mkdir()
    write_idx(src / "train-images-idx3-ubyte", images, gz)
    write_idx(src / "train-labels-idx1-ubyte", labels, gz)
    write_idx(src / "t10k-images-idx3-ubyte", images[:5], gz)
    write_idx(src / "t10k-labels-idx1-ubyte", labels[:5], gz)
    out = tmp_path / "out"
    done = pack_idx_dir(src, out, shard_size=10)
    assert done["train"]["count"] == 53 and len(done["train"]["shards"]) == 6
    assert done["test"]["count"] == 5
    got = all_samples(out, "train")
    assert len(got) == 53 and len({s["__key__"] for s in got}) == 53
    by_bytes = Counter()
    for s in got:
        arr = png_array(s["png"])
        match = [i for i in range(53) if np.array_equal(images[i], arr) and labels[i] == int(s["cls"])]
        assert match, f"sample {s['__key__']} is not a source image with its label"
        by_bytes[match[0]] += 1
    assert sorted(by_bytes) == list(range(53)) and set(by_bytes.values()) == {1}


def test_idx_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no '\\*-images-idx3-ubyte"):
        pack_idx_dir(tmp_path, tmp_path / "o", 10)
    (tmp_path / "x-images-idx3-ubyte").write_bytes(b"\x08\x08\x08\x03junk")
    (tmp_path / "x-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01\x01")
    with pytest.raises(DataError, match="bad magic"):
        pack_idx_dir(tmp_path, tmp_path / "o", 10)


def test_image_folder_with_classes(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    rng = np.random.default_rng(1)
    expected = {}
    for cls in ("cat", "dog"):
        (src / cls).mkdir(parents=True)
        for i in range(4):
            arr = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            Image.fromarray(arr).save(src / cls / f"{i}.png")
            expected[arr.tobytes()] = cls
    entry = pack_image_folder(src, tmp_path / "out", "train", 3, channels=3)
    assert entry["count"] == 8
    classes = load_index(tmp_path / "out")["classes"]
    assert classes == ["cat", "dog"]
    got = {png_array(s["png"]).tobytes(): classes[int(s["cls"])]
           for s in all_samples(tmp_path / "out", "train")}
    assert got == expected


def test_digits_pack(digits: Path) -> None:
    index = load_index(digits)
    assert index["splits"]["train"]["count"] + index["splits"]["test"]["count"] == 1797
    assert len(index["classes"]) == 10


@pytest.mark.parametrize(("sizes", "counts"), [([10], [4, 3, 3]), ([5, 5, 5, 5], [5] * 4), ([7, 1, 9], [4, 3, 4, 3, 3]),
                                               ([100, 20, 30, 1], [22, 22, 22, 22, 21, 21, 21])])
def test_plan_covers_each_sample_once(sizes: list[int], counts: list[int]) -> None:
    shards = [(f"s{i}", n) for i, n in enumerate(sizes)]
    for epoch in range(3):
        ordered, starts = epoch_shards(shards, seed=1, epoch=epoch)
        bounds = np.cumsum([0, *counts])
        plan = [to_pieces(np.arange(a, b), ordered, starts) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        seen = Counter((p.file, k) for slot in plan for p in slot for k in range(p.start, p.end))
        assert set(seen.values()) == {1} and len(seen) == sum(sizes)
        assert [sum(p.end - p.start for p in slot) for slot in plan] == counts


@pytest.mark.parametrize(("total", "world", "workers", "batch"), [(100, 1, 1, 16), (100, 3, 2, 8), (97, 4, 3, 5),
                                                                   (64, 2, 2, 16), (65, 2, 1, 32), (33, 4, 2, 4)])
def test_batch_sizes_use_every_sample_with_equal_steps(total: int, world: int, workers: int, batch: int) -> None:
    plan = batch_sizes(total, world, workers, batch)
    assert sum(sum(w) for r in plan for w in r) == total
    steps = [[b for i in range(max(len(w) for w in r)) for w in r for b in w[i : i + 1]] for r in plan]
    assert len({len(s) for s in steps}) == 1, "ranks take different numbers of steps"
    for step in zip(*steps, strict=True):  # the same batch size on every rank, up to one sample
        assert max(step) - min(step) <= 1 and min(step) >= 1 and max(step) <= batch + 1


def _pack_shards(root: Path, sizes: list[int]) -> set[str]:
    """A 'train' split of len(sizes) shards holding the given numbers of samples; returns every sample key."""
    rng = np.random.default_rng(0)
    shards = []
    for i, n in enumerate(sizes):
        images = rng.integers(0, 255, (n, 4, 4), dtype=np.uint8)
        shards += write_shards(((png_bytes(im), "png", j % 3) for j, im in enumerate(images)), root, f"part{i}",
                               shard_size=n)["shards"]
    update_index(root, "train", {"count": sum(sizes), "shards": shards}, 1, ["a", "b", "c"])
    return {s["__key__"] for s in all_samples(root, "train")}


# (shard sizes, ranks, workers, batch)
SHARDING_TABLE = [([40] * 4, 2, 2, 8), ([25, 31, 17, 40, 9], 2, 2, 6), ([30] * 6, 3, 2, 7), ([50, 3, 60], 1, 3, 16),
                  ([13] * 8, 4, 2, 3), ([70, 70], 2, 1, 32)]


@pytest.mark.parametrize(("sizes", "world", "workers", "batch"), SHARDING_TABLE)
def test_sharding_table_every_sample_once_equal_steps(tmp_path: Path, sizes: list[int], world: int, workers: int,
                                                      batch: int) -> None:
    """Through the real stream and DataLoader workers: an epoch consumes exactly the dataset, once each, and
    every rank takes the same number of steps; a second epoch is another order of the same samples."""
    from torch.utils.data import DataLoader

    keys = _pack_shards(tmp_path, sizes)
    for epoch in range(2):
        consumed, steps = [], []
        for rank in range(world):
            ds = ShardStream(tmp_path, "train", batch, rank, world, workers, seed=3, shuffle_buffer=10,
                             resolution=4, channels=1, hflip=False)
            ds.set_position(epoch, 0)
            batches = [b["key"] for b in DataLoader(ds, batch_size=None, num_workers=workers)]
            assert len(batches) == ds.batches_per_epoch
            steps.append(len(batches))
            consumed += [k for b in batches for k in b]
        assert len(set(steps)) == 1
        assert sorted(consumed) == sorted(keys)


def test_fewer_shards_than_readers_is_an_error(tmp_path: Path) -> None:
    _pack_shards(tmp_path, [20, 20, 20])
    with pytest.raises(DataError, match="has 3 shards for 2 ranks x 2 workers = 4 readers"):
        ShardStream(tmp_path, "train", 4, 0, 2, 2, 0, 10, 4, 1, False)


def test_stream_position_resumes_mid_epoch(digits: Path) -> None:
    from torch.utils.data import DataLoader

    def keys(start: int, epoch: int = 1) -> list[list[str]]:
        ds = ShardStream(digits, "train", 8, 0, 1, 2, seed=5, shuffle_buffer=40, resolution=8, channels=1,
                         hflip=False)
        ds.set_position(epoch, start)
        return [b["key"] for b in DataLoader(ds, batch_size=None, num_workers=2)]

    full = keys(0)
    assert keys(7) == full[7:]
    assert keys(0, epoch=2) != full


def test_stream_rejects_too_little_data(digits: Path) -> None:
    with pytest.raises(DataError, match="cannot fill one batch"):
        ShardStream(digits, "test", 256, 0, 2, 1, 0, 10, 8, 1, False)


def _rank_batches(root: Path, layout: ReadLayout, rank: int, epoch: int, start: int, done: tuple[Segment, ...],
                  stop: int | None = None, **kw) -> list[dict]:
    from torch.utils.data import DataLoader

    ds = ShardStream(root, "train", layout.batch, rank, layout.world, layout.workers, seed=7,
                     shuffle_buffer=layout.buffer, resolution=4, channels=1, hflip=False, **kw)
    ds.set_position(epoch, start, done)
    out = []
    for b in DataLoader(ds, batch_size=None, num_workers=layout.workers):
        if stop is not None and start + len(out) == stop:
            break
        out.append(b)
    return out


# Layouts a run passes through within one epoch, and the batches per rank it consumes under each.
LAYOUT_CHANGES = [
    [(ReadLayout(2, 2, 8, 10), 5), (ReadLayout(1, 1, 16, 20), None)],
    [(ReadLayout(1, 1, 8, 10), 7), (ReadLayout(2, 1, 8, 10), None)],
    [(ReadLayout(2, 2, 8, 10), 5), (ReadLayout(1, 1, 16, 20), 3), (ReadLayout(3, 2, 4, 5), None)],
    [(ReadLayout(1, 2, 6, 10), 4), (ReadLayout(1, 2, 6, 10), 3), (ReadLayout(4, 1, 5, 30), None)],
]


@pytest.mark.parametrize("changes", LAYOUT_CHANGES, ids=lambda c: "->".join(f"{a.world}x{a.workers}" for a, _ in c))
def test_layout_change_mid_epoch_reads_the_rest_once(tmp_path: Path, changes: list) -> None:
    """A run stopped mid-epoch and resumed with other ranks/workers/batch/buffer (possibly several times)
    reads every sample of the epoch exactly once, every rank of each part taking the same number of steps;
    the next epoch is a whole one under the last layout."""
    keys = _pack_shards(tmp_path, [40, 35, 50, 33, 42, 38])
    consumed: list[str] = []
    done: tuple[Segment, ...] = ()
    for layout, stop in changes:
        start = 0
        if done and done[-1].layout == layout:  # same layout: the position simply continues
            start = done[-1].consumed
            done = done[:-1]
        parts = [_rank_batches(tmp_path, layout, r, 0, start, done, stop) for r in range(layout.world)]
        assert len({len(p) for p in parts}) == 1, "ranks took different numbers of steps"
        consumed += [k for p in parts for b in p for k in b["key"]]
        done = (*done, Segment(layout, start + len(parts[0])))
    assert len(consumed) == len(keys) and set(consumed) == keys
    layout = changes[-1][0]
    nxt = [k for r in range(layout.world) for b in _rank_batches(tmp_path, layout, r, 1, 0, ()) for k in b["key"]]
    assert sorted(nxt) == sorted(keys)


def _corrupt(root: Path, faults: tuple[str, ...] = ("tar", "image", "missing")) -> dict[str, str]:
    """Damage the packed split: garbage over the second half of one shard ("tar"), one image's bytes
    ("image"), one sample without its image ("missing"). Returns {fault: the shard or key a report names}."""
    import webdataset as wds

    shards = [s["file"] for s in load_index(root)["splits"]["train"]["shards"]]
    tar = root / shards[1]
    raw = bytearray(tar.read_bytes())
    raw[len(raw) // 2 :] = np.random.default_rng(0).integers(0, 256, len(raw) - len(raw) // 2, dtype=np.uint8).tobytes()
    if "tar" in faults:
        tar.write_bytes(bytes(raw))
    samples = [{k: v for k, v in s.items() if k in ("__key__", "png", "cls")}
               for s in read_pieces([Piece(str(root / shards[0]), 0, 40)])]
    if "image" in faults:
        samples[3]["png"] = b"\x89PNG not really"
    if "missing" in faults:
        del samples[5]["png"]
    with wds.TarWriter(str(root / shards[0]), encoder=False) as w:
        for sample in samples:
            w.write(sample)
    return {"tar": shards[1], "image": samples[3]["__key__"], "missing": samples[5]["__key__"]}


def test_bad_samples_are_reported_counted_and_replaced(tmp_path: Path) -> None:
    """Lenient mode: each fault is reported naming shard or key, every rank still takes the planned number of
    full batches, and the count of bad samples equals the samples not trained on."""
    keys = _pack_shards(tmp_path / "clean", [40, 35, 50, 33])
    _pack_shards(tmp_path / "bad", [40, 35, 50, 33])
    bad = _corrupt(tmp_path / "bad")
    layout = ReadLayout(2, 2, 8, 10)
    parts = [_rank_batches(tmp_path / "bad", layout, r, 0, 0, ()) for r in range(2)]
    planned = [_rank_batches(tmp_path / "clean", layout, r, 0, 0, ()) for r in range(2)]
    sizes = [[len(b["key"]) for b in p] for p in parts]
    assert sizes == [[len(b["key"]) for b in p] for p in planned]
    assert all(b["image"].shape[0] == len(b["key"]) for p in parts for b in p)
    reports = [m for p in parts for b in p for m in b["bad"]]
    assert any(bad["tar"] in m and "unreadable after" in m for m in reports)
    assert any(bad["image"] in m and "UnidentifiedImageError" in m for m in reports)
    assert any(bad["missing"] in m and "no image" in m for m in reports)
    lost = sum(b["bad_count"] for p in parts for b in p)
    seen = {k for p in parts for b in p for k in b["key"]}
    assert lost > 2 and len(keys - seen) == lost


@pytest.mark.parametrize("fault", ["tar", "image", "missing"])
def test_strict_mode_fails_naming_shard_and_key(tmp_path: Path, fault: str) -> None:
    _pack_shards(tmp_path, [40, 35, 50, 33])
    bad = _corrupt(tmp_path, (fault,))
    with pytest.raises(DataError, match=bad[fault]):
        _rank_batches(tmp_path, ReadLayout(1, 1, 8, 10), 0, 0, 0, (), strict=True)
