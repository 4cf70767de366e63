"""`gen-dist data text-embeddings` on captioned copies of a packed dataset's splits: captions per second and the
largest resident memory of any process, for splits of different sizes (memory must not grow with the split).

    python benchmarks/text_embeddings.py [--data data/fashion_mnist] [--encoder models/all-MiniLM-L6-v2] [--nproc 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import webdataset as wds

NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def captioned(src: Path, split: str, out: Path) -> Path:
    """The split's shards with a txt caption per sample, as img2dataset writes them."""
    out.mkdir(parents=True)
    index = json.loads((src / "index.json").read_text())
    entry = index["splits"][split]
    for shard in entry["shards"]:
        with wds.TarWriter(str(out / shard["file"]), encoder=False) as w:
            for i, s in enumerate(wds.WebDataset(str(src / shard["file"]), shardshuffle=False)):
                name = NAMES[int(s["cls"]) % len(NAMES)]
                w.write({"__key__": s["__key__"], "png": s["png"], "txt": f"photo {i} of a {name}".encode()})
    (out / "index.json").write_text(json.dumps({**index, "splits": {split: entry}}))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="data/fashion_mnist")
    p.add_argument("--encoder", default="models/all-MiniLM-L6-v2")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--max-length", default="16")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for split in ("test", "train"):
            source = captioned(Path(args.data), split, Path(tmp) / split)
            count = json.loads((source / "index.json").read_text())["splits"][split]["count"]
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "gen_dist", "data", "text-embeddings", str(source), "--split", split,
                            "--encoder", args.encoder, "--max-length", args.max_length, "--out",
                            str(Path(tmp) / f"{split}-emb"), "--nproc", str(args.nproc)], check=True,
                           capture_output=True)
            seconds = time.perf_counter() - t0
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB, all runs so far
            print(f"{split}: {count} captions in {seconds:.1f} s ({count / seconds:.0f} captions/s, {args.nproc} "
                  f"processes); largest process so far {peak:.2f} GiB")


if __name__ == "__main__":
    main()
