"""Content-addressed blob store on disk, and the cache of finished reports.

Blobs live at ``<root>/blobs/sha256/<first two hex digits>/<digest>``. An upload is written to
a temporary file under ``<root>/tmp`` and renamed into place only after its digest and size
are verified, so a broken, cancelled or oversize upload leaves nothing behind and a blob that
is present is always complete. The same digest uploaded twice is stored once.

Reports live at ``<root>/results/<first two hex digits>/<key>.json``, keyed by the sha256 of
the canonical request (model and data digests included), written the same way (temporary
file, then rename), so both survive a restart or a SIGKILL intact.

Garbage collection removes the least recently used blobs and reports (a file's mtime is
touched whenever it is used) by age and by total size, but never a blob that a queued or
running analysis holds (``acquire``/``release`` count those references).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import unquote, urlparse

from . import metrics
from .errors import InvalidInput, NotFound, PermissionDenied, ResourceExhausted

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class BlobInfo:
    sha256: str
    size_bytes: int


def check_digest(sha256: str) -> str:
    """Return the digest if it is 64 lower-case hex digits, else raise InvalidInput."""
    if not _DIGEST.match(sha256 or ""):
        raise InvalidInput(f"'{sha256}' is not a sha256 digest (64 lower-case hex digits)")
    return sha256


class BlobWriter:
    """One upload in progress: bytes go to a temporary file while the digest is computed."""

    def __init__(self, store: "BlobStore", expected_sha256: str, expected_size: int, max_bytes: int):
        self._store = store
        self._expected_sha256 = check_digest(expected_sha256)
        self._expected_size = expected_size
        self._max_bytes = max_bytes
        if expected_size > max_bytes:
            raise ResourceExhausted(
                f"upload of {expected_size} bytes is over this server's limit of {max_bytes} bytes"
            )
        self._hash = hashlib.sha256()
        self._size = 0
        fd, name = tempfile.mkstemp(dir=store.tmp_dir, prefix="upload-")
        self._file = os.fdopen(fd, "wb")
        self._tmp_path = Path(name)

    def write(self, data: bytes | memoryview) -> None:
        self._size += len(data)
        if self._size > self._max_bytes:
            raise ResourceExhausted(
                f"upload is over this server's limit of {self._max_bytes} bytes"
            )
        if self._size > self._expected_size:
            raise InvalidInput(
                f"upload sent more than the {self._expected_size} bytes its header declared"
            )
        self._hash.update(data)
        self._file.write(data)

    def commit(self) -> BlobInfo:
        """Verify size and digest, then move the file into place (atomic rename)."""
        self._file.close()
        if self._size != self._expected_size:
            raise InvalidInput(
                f"upload ended after {self._size} of the {self._expected_size} bytes declared; send the whole file"
            )
        digest = self._hash.hexdigest()
        if digest != self._expected_sha256:
            raise InvalidInput(
                f"uploaded bytes have sha256 {digest}, not the declared {self._expected_sha256}; "
                "the file changed or was corrupted in transit"
            )
        final = self._store.path_for(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            self._tmp_path.unlink(missing_ok=True)
            self._store.touch(final)
        else:
            os.chmod(self._tmp_path, 0o444)
            os.replace(self._tmp_path, final)
            self._store.add_bytes("blobs", self._size)
        return BlobInfo(digest, self._size)

    def abort(self) -> None:
        """Drop the partial upload; safe to call more than once and after commit."""
        if not self._file.closed:
            self._file.close()
        self._tmp_path.unlink(missing_ok=True)


@dataclass(frozen=True)
class GcResult:
    removed_files: int
    removed_bytes: int
    kept_in_use: int


def result_key(canonical: dict[str, Any]) -> str:
    """The cache key of a canonical request: sha256 of its sorted, compact JSON."""
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class BlobStore:
    """Blobs by sha256, cached reports, plus read-only model roots that ``file://`` URIs may
    point into. ``max_bytes``/``max_age_seconds`` (0 = none) bound it through ``gc``."""

    def __init__(self, root: Path, model_roots: list[Path] | None = None, *,
                 max_bytes: int = 0, max_age_seconds: float = 0.0):
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        self.results_dir = self.root / "results"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.model_roots = [Path(r).resolve() for r in (model_roots or [])]
        self.max_bytes = max_bytes
        self.max_age_seconds = max_age_seconds
        # Guards the reference counts, the byte totals and every removal by the GC.
        self._lock = threading.Lock()
        self._in_use: collections.Counter[str] = collections.Counter()
        self._clean_stale_uploads()
        self._bytes = {kind: sum(size for _, size, _ in self._files(kind)) for kind in ("blobs", "results")}
        self._publish_bytes()

    def _clean_stale_uploads(self) -> None:
        # A server killed mid-upload (or mid-write of a report) leaves a temporary file; it was
        # never a blob or a report.
        for pattern in ("upload-*", "result-*"):
            for stale in self.tmp_dir.glob(pattern):
                stale.unlink(missing_ok=True)

    def path_for(self, sha256: str) -> Path:
        return self.blobs_dir / sha256[:2] / sha256

    # -- bookkeeping --------------------------------------------------------------------------
    @staticmethod
    def touch(path: Path) -> None:
        """Mark a file as used now (the GC removes the least recently used first)."""
        try:
            os.utime(path)
        except FileNotFoundError:
            pass

    def add_bytes(self, kind: str, size: int) -> None:
        with self._lock:
            self._bytes[kind] += size
        self._publish_bytes()

    def _publish_bytes(self) -> None:
        for kind, size in self._bytes.items():
            metrics.STORE_BYTES.labels(kind).set(size)

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return sum(self._bytes.values())

    def acquire(self, digests: Iterable[str]) -> None:
        """Hold blobs for a queued or running analysis: the GC leaves them alone."""
        with self._lock:
            self._in_use.update(digests)

    def release(self, digests: Iterable[str]) -> None:
        with self._lock:
            self._in_use.subtract(digests)
            self._in_use += collections.Counter()  # drop the zero counts

    def in_use(self) -> set[str]:
        with self._lock:
            return set(self._in_use)

    def _files(self, kind: str) -> Iterable[tuple[Path, int, float]]:
        """(path, size, mtime) of every blob or report."""
        pattern = "*/*" if kind == "blobs" else "*/*.json"
        directory = self.blobs_dir if kind == "blobs" else self.results_dir
        for path in directory.glob(pattern):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            yield path, stat.st_size, stat.st_mtime

    def gc(self, now: float | None = None) -> GcResult:
        """Remove blobs and reports unused for ``max_age_seconds``, then the least recently used
        until the store fits in ``max_bytes``; blobs held by analyses are kept."""
        now = time.time() if now is None else now
        entries = sorted(((mtime, path, size, kind) for kind in ("blobs", "results")
                          for path, size, mtime in self._files(kind)), key=lambda e: e[0])
        total = sum(size for _, _, size, _ in entries)
        removed = removed_bytes = kept = 0
        for mtime, path, size, kind in entries:
            too_old = self.max_age_seconds and now - mtime > self.max_age_seconds
            too_big = self.max_bytes and total > self.max_bytes
            if not (too_old or too_big):
                continue
            with self._lock:
                if kind == "blobs" and self._in_use[path.name] > 0:
                    kept += 1
                    continue
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                self._bytes[kind] -= size
            total -= size
            removed += 1
            removed_bytes += size
            metrics.STORE_EVICTIONS.labels(kind).inc()
        self._publish_bytes()
        if removed:
            log.info("store gc removed %d files (%d bytes); %d bytes left", removed, removed_bytes, total)
        return GcResult(removed, removed_bytes, kept)

    # -- reports ------------------------------------------------------------------------------
    def _result_path(self, key: str) -> Path:
        return self.results_dir / key[:2] / f"{check_digest(key)}.json"

    def get_result(self, key: str) -> dict[str, Any] | None:
        """The cached report for ``key``, or None."""
        path = self._result_path(key)
        try:
            report = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            # Written atomically, so this is damage from outside: drop it and recompute.
            log.warning("dropping unreadable cached report %s", path.name)
            path.unlink(missing_ok=True)
            return None
        self.touch(path)
        return report

    def put_result(self, key: str, report: dict[str, Any]) -> None:
        """Store a report atomically (temporary file, fsync, rename)."""
        path = self._result_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(report, allow_nan=False, separators=(",", ":")).encode()
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="result-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            existed = path.exists()
            os.replace(name, path)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        if not existed:
            self.add_bytes("results", len(text))

    def writer(self, sha256: str, size_bytes: int, max_bytes: int) -> BlobWriter:
        return BlobWriter(self, sha256, size_bytes, max_bytes)

    def stat(self, sha256: str) -> BlobInfo:
        path = self.path_for(check_digest(sha256))
        if not path.is_file():
            raise NotFound(f"no blob with sha256 {sha256} on this server; upload it first")
        return BlobInfo(sha256, path.stat().st_size)

    def resolve_blob(self, sha256: str) -> Path:
        self.stat(sha256)
        path = self.path_for(sha256)
        self.touch(path)
        return path

    def resolve_uri(self, uri: str) -> Path:
        """A ``file://`` URI inside one of the model roots, resolved without following it out."""
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise InvalidInput(f"unsupported URI '{uri}': use a file:// URI under a model root, or upload the file")
        if not self.model_roots:
            raise PermissionDenied("this server has no model roots configured; upload the file instead")
        path = Path(unquote(parsed.path)).resolve()
        if not any(path.is_relative_to(root) for root in self.model_roots):
            raise PermissionDenied(f"'{uri}' is outside the server's model roots")
        if not path.is_file():
            raise NotFound(f"'{uri}' does not exist on the server")
        return path

