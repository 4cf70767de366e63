"""Data where it lives: shards in img2dataset's layout (jpg, txt, json, _stats.json) served over HTTP by Python's
server and from S3 by SeaweedFS, read by 2 ranks x 2 loader workers. Every sample once per epoch through a
storage outage, a kill -9 and a resume on another world size; `gen-dist data index` as wids reads it; wrong
URLs, buckets and credentials refused before launch; the S3 secret nowhere in the run directory."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CONFIGS, ROOT, events, free_port, kill_tree, run_cli, step_records
from storage import SECRET_KEY, HTTPServer, S3Server, write_img2dataset_shards

from gen_dist.config import load_config
from gen_dist.data import DataError, Piece, Retry, open_catalog, read_pieces, reference_catalog

SHARDS, PER_SHARD, BATCH = 16, 16, 4
"""256 samples: 4 shards per reader, so that readers open shards all through the epoch."""
EPOCH = SHARDS * PER_SHARD // (2 * BATCH)
"""Steps of one epoch on 2 ranks."""


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("img2dataset")
    return root, write_img2dataset_shards(root, SHARDS, PER_SHARD)


def _args(run_dir: Path, path: str, *extra: str) -> list[str]:
    return [str(CONFIGS / "smoke_vae.yaml"), f"run_dir={run_dir}", f"data.path={path}", "data.channels=3",
            f"data.batch_size={BATCH}", "data.num_workers=2", "data.shuffle_buffer=2", "data.prefetch=1",
            "data.label_key=json:label", "data.caption_key=txt", "train.log_keys=true", "train.ckpt_every=4",
            "track.backends=[jsonl]", *extra]


def _start(nproc: int, args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gen_dist", "launch", *args, "--nproc", str(nproc), "--cpu", "--port", free_port()]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        beat = run_dir / "heartbeat.json"
        try:
            if json.loads(beat.read_text()).get("step", 0) >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"the run did not reach step {step} (exit code {proc.poll()})")


def _epoch_keys(run_dir: Path, resumed_at: int | None = None) -> list[str]:
    """Keys trained on, step by step and rank by rank. Records of steps from `resumed_at` on written before the
    resume (by ranks the resumed run no longer has) are left out: those steps were trained again."""
    by_step: dict[tuple[int, int], list[str]] = {}
    for f in sorted(run_dir.glob("keys_rank*.jsonl")):
        rank = int(f.stem.removeprefix("keys_rank"))
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if resumed_at is not None and rank > 0 and rec["step"] >= resumed_at:
                continue
            by_step[(rec["step"], rank)] = rec["keys"]
    return [k for _, keys in sorted(by_step.items()) for k in keys]


def test_http_epoch_survives_a_server_restart_and_index_is_wids(shards: tuple[Path, list[str]], tmp_path: Path
                                                                 ) -> None:
    root, keys = shards
    with HTTPServer(root) as server:
        pattern = f"{server.url}/{{00000..{SHARDS - 1:05d}}}.tar"
        index = tmp_path / "shards.json"
        run_cli("data", "index", pattern, "--out", str(index))
        spec = json.loads(index.read_text())
        assert spec["__kind__"] == "wids-shard-index-v1" and len(spec["shardlist"]) == SHARDS
        assert {s["nsamples"] for s in spec["shardlist"]} == {PER_SHARD} and spec["shardlist"][0]["filesize"] > 0
        import wids

        assert len(wids.ShardListDataset(str(index))) == len(keys)  # the wids package reads it

        bad = run_cli("launch", *_args(tmp_path / "x", f"{server.url}/{{00090..00091}}.tar"), "--dry-run",
                      check=False)
        assert bad.returncode == 2 and f"{server.url}/00090.tar: HTTP 404" in bad.stderr, bad.stderr

        run_dir = tmp_path / "run"
        log = tmp_path / "train.log"
        # Counts from img2dataset's _stats.json; two epochs, the server down for 4 s early in the first.
        cache = tmp_path / "cache"  # smaller than the data set: shards are evicted while the second epoch reads
        proc = _start(2, _args(run_dir, pattern, f"train.steps={2 * EPOCH}", "data.retry_seconds=60",
                               f"data.cache_dir={cache}", "data.cache_gb=0.0003"), log)
        _wait_for_step(run_dir, 2, proc)
        server.stop()
        time.sleep(4)
        server.start()
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "retrying in" in text, text[-3000:]
    trained = _epoch_keys(run_dir)
    assert len(trained) == 2 * len(keys)
    assert sorted(trained[: len(keys)]) == sorted(keys) == sorted(trained[len(keys):])  # each once per epoch
    assert all(r["data/bad_samples"] == 0 for r in step_records(run_dir))
    cached = [f.stat().st_size for f in cache.iterdir()]
    assert cached and not any(f.name.startswith(".") for f in cache.iterdir())
    # Each of the 4 readers keeps the shard it just fetched; the rest stays within data.cache_gb.
    assert sum(cached) <= 300_000 + 4 * max(cached) < sum((root / f"{i:05d}.tar").stat().st_size for i in range(SHARDS))

    # A server that stays down: after the retries its shard is named, counted as lost, or an error under strict.
    gone = [Piece(f"{server.url}/00000.tar", 0, PER_SHARD)]
    problems: list[tuple[str, int]] = []
    assert list(read_pieces(gone, problems, Retry(patience=1, longest=1), log=lambda m: None)) == []
    assert problems[0][1] == PER_SHARD and problems[0][0].startswith(f"{server.url}/00000.tar: unreadable")
    with pytest.raises(DataError, match=f"{server.url}/00000.tar: unreadable after 0 of the {PER_SHARD}"):
        list(read_pieces(gone, None, Retry(patience=1, longest=1), log=lambda m: None))

    # pipe: commands and gzipped shards, counted by `gen-dist data index`; evaluation reads another source.
    gz = tmp_path / "gz"
    gz.mkdir()
    (gz / "00000.tar.gz").write_bytes(gzip.compress((root / "00000.tar").read_bytes()))
    shutil.copy(root / "00000_stats.json", gz / "00000_stats.json")
    run_cli("data", "index", f"pipe:cat {root}/{{00000..00001}}.tar::{gz / '00000.tar.gz'}", "--out",
            str(tmp_path / "mixed.json"))
    catalog = open_catalog("unused", index=str(tmp_path / "mixed.json"))
    assert [s.count for s in catalog.shards] == [PER_SHARD] * 3
    got = [s["__key__"] for s in read_pieces([Piece(s.url, 0, s.count) for s in catalog.shards])]
    assert got == keys[:2 * PER_SHARD] + keys[:PER_SHARD]
    cfg = load_config(CONFIGS / "smoke_vae.yaml", [f"data.path={pattern}", f"eval.reference_path={gz}"])
    assert reference_catalog(cfg).total == PER_SHARD

    changed = tmp_path / "changed"  # a shard rewritten after it was indexed is named when it is read
    changed.mkdir()
    shutil.copy(root / "00000.tar", changed / "00000.tar")
    run_cli("data", "index", str(changed), "--out", str(changed / "shards.json"))
    with open(changed / "00000.tar", "ab") as f:
        f.write(b"\0" * 512)
    catalog = open_catalog(str(changed), index=str(changed / "shards.json"))
    with pytest.raises(DataError, match="00000.tar changed since it was indexed"):
        list(read_pieces([Piece(s.url, 0, s.count) for s in catalog.shards], stats={s.url: s.stat for s in
                                                                                    catalog.shards}))


def test_s3_kill9_resume_on_another_world_size_and_no_secret(shards: tuple[Path, list[str]], tmp_path: Path
                                                            ) -> None:
    root, keys = shards
    with S3Server(tmp_path / "s3") as s3:
        s3.upload("data", "i2d", [p for p in sorted(root.iterdir()) if p.suffix == ".tar"])  # no _stats.json
        env = s3.env
        prefix = "s3://data/i2d/"
        index = tmp_path / "index.json"
        proc = subprocess.run([sys.executable, "-m", "gen_dist", "data", "index", prefix, "--out", str(index)],
                              cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert sum(s["nsamples"] for s in json.loads(index.read_text())["shardlist"]) == len(keys)

        def launch_check(path: str, **changes: str) -> subprocess.CompletedProcess:
            cmd = [sys.executable, "-m", "gen_dist", "launch", *_args(tmp_path / "x", path), "--dry-run"]
            return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env, **changes}, capture_output=True,
                                  text=True, timeout=120)

        t0 = time.monotonic()
        missing = launch_check("s3://nobucket/i2d/")
        assert missing.returncode == 2 and "s3://nobucket/i2d/: S3 refused it (NoSuchBucket)" in missing.stderr
        refused = launch_check(prefix, AWS_SECRET_ACCESS_KEY="not-the-secret")
        assert refused.returncode == 2 and "S3 refused it" in refused.stderr and "Traceback" not in refused.stderr
        assert time.monotonic() - t0 < 60

        run_dir = tmp_path / "run"
        args = _args(run_dir, prefix, f"data.index={index}", "train.steps=1000")
        proc = _start(2, args, tmp_path / "first.log", env)
        _wait_for_step(run_dir, 6, proc)  # a checkpoint at step 4, and more steps trained after it
        kill_tree(proc)
        saved = max(int(p.parent.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*/meta.json"))
        rest = (len(keys) - 2 * BATCH * saved) // BATCH  # the rest of the epoch on one rank
        resumed = subprocess.run([sys.executable, "-m", "gen_dist", "train", *args[:-1],
                                  f"train.steps={saved + rest}"], cwd=ROOT, env={**os.environ, **env},
                                 capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    (resume,) = events(run_dir, "resume")
    assert resume["step"] == saved
    trained = _epoch_keys(run_dir, resumed_at=resume["step"])
    assert sorted(trained) == sorted(keys)  # the epoch: each sample once, across the kill and the new world size
    assert [e["now"][0] for e in events(run_dir, "data_layout_changed")] == [1]
    leaked = [str(f) for f in run_dir.rglob("*") if f.is_file() and SECRET_KEY.encode() in f.read_bytes()]
    assert leaked == []
