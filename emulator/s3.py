"""The local S3: a folder per bucket, each object a file at its key.

The emulated cloud's services (Firehose, Athena, the rules engine's S3 error action) share one
emulation root; ``<root>/s3/<bucket>/<key>`` is the object ``s3://<bucket>/<key>``. An object is
written to a temporary file in ``<root>/s3/.uploads/`` and renamed into place, so a reader
(Athena's DuckDB scanning a prefix) never sees half an object, as S3 never shows a partial PUT::

    bucket = LocalBucket(root, "metergateway-data")
    bucket.put("readings/kind=raw/dt=2025-03-01/x.gz", data)
    bucket.keys("readings/")          # ['readings/kind=raw/dt=2025-03-01/x.gz']
    bucket.uri_to_path("s3://metergateway-data/athena-results/")

Only what the emulation needs: put, get, list by prefix, and turning ``s3://`` URIs into paths.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["LocalBucket", "S3Error"]


class S3Error(ValueError):
    """A key or URI the local S3 cannot take, with the reason."""


class LocalBucket:
    """One bucket of the local S3, under ``<root>/s3/<name>/``."""

    def __init__(self, root: str | os.PathLike, name: str):
        self.name = name
        self.path = Path(root) / "s3" / name

    def object_path(self, key: str) -> Path:
        """The file that holds ``key``; refuses keys that would leave the bucket's folder."""
        if not key or key.startswith("/") or key.endswith("/"):
            raise S3Error(f"s3://{self.name}/{key}: an object key must not be empty, start or end with '/'")
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise S3Error(f"s3://{self.name}/{key}: empty, '.' and '..' path segments are not supported locally")
        return self.path.joinpath(*parts)

    def put(self, key: str, data: bytes) -> Path:
        """Write an object atomically (temporary file, then rename); returns its path."""
        target = self.object_path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Outside the bucket's folder, so that a scan of a prefix never meets a half-written file.
        uploads = self.path.parent / ".uploads"
        uploads.mkdir(parents=True, exist_ok=True)
        tmp = uploads / f"{self.name}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
        return target

    def get(self, key: str) -> bytes:
        return self.object_path(key).read_bytes()

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key starting with ``prefix``, sorted."""
        if not self.path.is_dir():
            return []
        found = []
        for p in self.path.rglob("*"):
            if p.is_file():
                key = p.relative_to(self.path).as_posix()
                if key.startswith(prefix):
                    found.append(key)
        return sorted(found)

    def uri_to_path(self, uri: str) -> Path:
        """The local folder or file of ``s3://<this bucket>/<key or prefix>``."""
        head = f"s3://{self.name}/"
        if uri == f"s3://{self.name}":
            return self.path
        if not uri.startswith(head):
            raise S3Error(f"{uri}: not in the local bucket s3://{self.name}/")
        rest = uri[len(head):].strip("/")
        return self.path.joinpath(*rest.split("/")) if rest else self.path
