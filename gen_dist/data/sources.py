"""Where shards live: local paths, http(s) URLs, S3-compatible object storage (s3://bucket/key) and `pipe:`
commands (as webdataset defines them). A URL is opened as a byte stream, asked for its size and ETag, and listed
where the store can list. Endpoints and credentials come from the environment alone (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...), never from a config, so that no secret is written to
a run directory, a log or a job script."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import braceexpand

from gen_dist.data.shards import DataError

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TIMEOUT_S = 30.0
"""A connection or read that makes no progress for this long fails (and is retried)."""


class SourceError(DataError):
    """A URL that cannot be read. `transient` failures (a refused connection, a timeout, a 5xx) are worth
    retrying; the others (no such key or bucket, refused credentials) are not."""

    def __init__(self, url: str, why: str, transient: bool) -> None:
        super().__init__(f"{url}: {why}")
        self.url, self.why, self.transient = url, why, transient

    def __reduce__(self) -> tuple:  # raised on the main rank, re-raised on the others
        return SourceError, (self.url, self.why, self.transient)


@dataclass(frozen=True)
class Stat:
    size: int
    etag: str = ""


def kind(url: str) -> str:
    """local, http, s3 or pipe."""
    if url.startswith(("http://", "https://")):
        return "http"
    if url.startswith("s3://"):
        return "s3"
    if url.startswith("pipe:"):
        return "pipe"
    return "local"


def is_remote(url: str) -> bool:
    return kind(url) != "local"


def expand(source: str) -> list[str]:
    """A source's URLs: `::`-separated parts, each a brace pattern (`{00000..00099}`)."""
    return [u for part in source.split("::") if part.strip() for u in braceexpand.braceexpand(part.strip())]


def join(base: str, name: str) -> str:
    """`name` beside or below `base` (a directory path or URL prefix)."""
    if is_remote(base):
        return base.rstrip("/") + "/" + name
    return str(Path(base) / name)


def is_shard(url: str) -> bool:
    return url.endswith(SHARD_SUFFIXES)


# ---------------------------------------------------------------------------------------------- S3


def _split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key


def s3_client() -> Any:
    """One client per process, configured from the environment (AWS_ENDPOINT_URL for S3-compatible stores). Per
    process: loader workers are forked, and a client's pooled connections must not be shared across a fork."""
    return _client_of(os.getpid())


@functools.cache
def _client_of(pid: int) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:
        raise DataError(f"s3:// sources need boto3 ({e})") from None
    config = Config(connect_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S, retries={"max_attempts": 1},
                    s3={"addressing_style": os.environ.get("GEN_DIST_S3_ADDRESSING", "path")})
    return boto3.session.Session().client("s3", config=config)


def _s3_error(url: str, e: Exception) -> SourceError:
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(e, NoCredentialsError):
        return SourceError(url, "no S3 credentials in the environment (AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)", transient=False)
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return SourceError(url, f"S3 refused it ({code or status})", transient=status >= 500 or status in (0, 429))
    return SourceError(url, f"{type(e).__name__}: {e}", transient=True)


# ---------------------------------------------------------------------------------------------- reading


def _http_error(url: str, e: Exception) -> SourceError:
    if isinstance(e, urllib.error.HTTPError):
        return SourceError(url, f"HTTP {e.code} {e.reason}", transient=e.code >= 500 or e.code == 429)
    return SourceError(url, f"{type(e).__name__}: {getattr(e, 'reason', e)}", transient=True)


@contextmanager
def open_stream(url: str, expect: Stat | None = None) -> Iterator[IO[bytes]]:
    """The bytes of `url` as a stream. With `expect` (the size and ETag an index recorded), a shard that no
    longer has them is an error naming it: it changed since it was indexed."""
    k = kind(url)
    try:
        if k == "local":
            f: Any = open(url, "rb")  # noqa: SIM115 (closed below)
            found = Stat(os.fstat(f.fileno()).st_size)
        elif k == "http":
            f = urllib.request.urlopen(url, timeout=TIMEOUT_S)  # noqa: S310 (http(s) only)
            found = Stat(int(f.headers.get("Content-Length") or -1), (f.headers.get("ETag") or "").strip('"'))
        elif k == "s3":
            bucket, key = _split_s3(url)
            obj = s3_client().get_object(Bucket=bucket, Key=key)
            f, found = obj["Body"], Stat(int(obj["ContentLength"]), obj.get("ETag", "").strip('"'))
        else:
            proc = subprocess.Popen(url.removeprefix("pipe:"), shell=True, stdout=subprocess.PIPE)  # noqa: S602
            f, found = proc.stdout, None
    except SourceError:
        raise
    except FileNotFoundError:
        raise SourceError(url, "no such file", transient=False) from None
    except OSError as e:
        raise (_http_error(url, e) if k == "http" else SourceError(url, f"{type(e).__name__}: {e}", True)) from None
    except Exception as e:  # noqa: BLE001 - botocore's errors, sorted into transient or not
        raise _s3_error(url, e) from None
    try:
        if found is not None and expect is not None and _differs(expect, found):
            raise DataError(f"{url} changed since it was indexed ({expect.size} bytes, ETag {expect.etag or '-'} "
                            f"then; {found.size} bytes, ETag {found.etag or '-'} now): index it again with "
                            f"`gen-dist data index`")
        yield f
    finally:
        f.close()


def _differs(then: Stat, now: Stat) -> bool:
    """Another size, or another ETag where both are known (a pipe: or a plain HTTP server may give neither)."""
    sizes = then.size >= 0 and now.size >= 0 and then.size != now.size
    return sizes or bool(then.etag and now.etag and then.etag != now.etag)


def read_bytes(url: str) -> bytes:
    """A whole small object (an index, a stats file)."""
    with open_stream(url) as f:
        return f.read()


def exists(url: str) -> bool:
    try:
        stat(url)
    except SourceError as e:
        if e.transient:
            raise
        return False
    return True


def stat(url: str) -> Stat:
    """Size and ETag of `url` without reading it (a pipe: -1)."""
    k = kind(url)
    try:
        if k == "local":
            return Stat(os.stat(url).st_size)
        if k == "http":
            request = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as r:  # noqa: S310
                return Stat(int(r.headers.get("Content-Length") or -1), (r.headers.get("ETag") or "").strip('"'))
        if k == "s3":
            bucket, key = _split_s3(url)
            head = s3_client().head_object(Bucket=bucket, Key=key)
            return Stat(int(head["ContentLength"]), head.get("ETag", "").strip('"'))
        return Stat(-1)
    except FileNotFoundError:
        raise SourceError(url, "no such file", transient=False) from None
    except OSError as e:
        raise (_http_error(url, e) if k == "http" else SourceError(url, f"{type(e).__name__}: {e}", True)) from None
    except Exception as e:  # noqa: BLE001
        raise _s3_error(url, e) from None


def list_shards(prefix: str) -> list[str]:
    """The shard files directly in a local directory or under an S3 prefix, sorted; http has no listing."""
    k = kind(prefix)
    if k == "local":
        return sorted(str(p) for p in Path(prefix).iterdir() if is_shard(p.name))
    if k != "s3":
        raise DataError(f"{prefix}: an {k} source cannot be listed; name its shards with a brace pattern, e.g. "
                        f"{prefix.rstrip('/')}/{{00000..00099}}.tar")
    bucket, key = _split_s3(prefix)
    key = key.rstrip("/") + "/" if key else ""
    found: list[str] = []
    try:
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key, Delimiter="/"):
            found += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", []) if is_shard(o["Key"])]
    except Exception as e:  # noqa: BLE001
        raise _s3_error(prefix, e) from None
    return sorted(found)


@dataclass(frozen=True)
class Cache:
    """data.cache_dir: whole remote shards kept on local disk for the next epochs; beyond `max_bytes` the least
    recently read go first. Shared by the ranks and loader workers of a machine: a shard is written under a
    temporary name and renamed, and a reader keeps a file it has open even when another process evicts it."""

    dir: str
    max_bytes: int

    def local(self, url: str, expect: Stat | None) -> str:
        """The path of `url`'s copy, downloaded first where there is none."""
        path = Path(self.dir) / (hashlib.sha1(url.encode()).hexdigest()[:24] + Path(url.split("?")[0]).suffix)
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)  # read now: the last to be evicted
            return str(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open_stream(url, expect) as f, open(tmp, "wb") as out:
                shutil.copyfileobj(f, out, 1 << 20)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._evict(keep=path)
        return str(path)

    def _evict(self, keep: Path) -> None:
        files = []
        for f in Path(self.dir).iterdir():
            with contextlib.suppress(FileNotFoundError):
                if not f.name.startswith("."):
                    files.append((f.stat().st_mtime, f.stat().st_size, f))
        total = sum(size for _, size, _ in files)
        for _, size, f in sorted(files):
            if total <= self.max_bytes:
                break
            if f != keep:
                f.unlink(missing_ok=True)
                total -= size
