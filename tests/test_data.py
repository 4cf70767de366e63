import gzip
import io
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gen_dist.data import DataError, ShardStream, load_index, pack_idx_dir, pack_image_folder, plan_epoch, read_pieces


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


def all_samples(root: Path, split: str) -> list[dict]:
    from gen_dist.data import Piece

    entry = load_index(root)["splits"][split]
    return list(read_pieces(root, [Piece(s["file"], 0, s["count"]) for s in entry["shards"]]))


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


@pytest.mark.parametrize(("sizes", "slots"), [([10], 3), ([5, 5, 5, 5], 4), ([7, 1, 9], 5), ([3, 3], 6),
                                              ([100, 20, 30, 1], 7)])
def test_plan_covers_each_sample_once(sizes: list[int], slots: int) -> None:
    shards = [(f"s{i}", n) for i, n in enumerate(sizes)]
    for epoch in range(3):
        plan = plan_epoch(shards, slots, seed=1, epoch=epoch)
        seen = Counter((p.file, k) for slot in plan for p in slot for k in range(p.start, p.end))
        assert set(seen.values()) == {1} and len(seen) == sum(sizes)
        lengths = [sum(p.end - p.start for p in slot) for slot in plan]
        assert max(lengths) - min(lengths) <= 1


@pytest.mark.parametrize(("world", "workers"), [(1, 1), (2, 1), (2, 3), (3, 2)])
def test_stream_splits_ranks_and_workers(digits: Path, world: int, workers: int) -> None:
    """Every rank gets the same number of batches; no sample twice in an epoch; only a short tail is dropped."""
    from torch.utils.data import DataLoader

    keys: list[str] = []
    counts = []
    for rank in range(world):
        ds = ShardStream(digits, "train", 16, rank, world, workers, seed=3, shuffle_buffer=50, resolution=8,
                         channels=1, hflip=True)
        loader = DataLoader(ds, batch_size=None, num_workers=workers)
        batches = list(loader)
        counts.append(len(batches))
        assert len(batches) == ds.batches_per_epoch
        for b in batches:
            assert b["image"].shape == (16, 1, 8, 8) and b["label"].min() >= 0
            keys += b["key"]
    assert len(set(counts)) == 1
    assert len(keys) == len(set(keys))
    total = load_index(digits)["splits"]["train"]["count"]
    assert total - len(keys) < world * workers * 16


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
        ShardStream(digits, "test", 128, 0, 2, 2, 0, 10, 8, 1, False)
