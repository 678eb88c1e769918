"""Content-addressed blob store on disk, and the cache of finished reports.

Blobs live at ``<root>/blobs/sha256/<first two hex digits>/<digest>``. An upload is written to
a temporary file under ``<root>/tmp`` and renamed into place only after its digest and size
are verified, so a broken, cancelled or oversize upload leaves nothing behind and a blob that
is present is always complete. The same digest uploaded twice is stored once.

Reports live at ``<root>/results/<first two hex digits>/<key>.json``, keyed by the sha256 of
the canonical request (model and data digests included), written the same way (temporary
file, then rename), so both survive a restart or a SIGKILL intact. A report is kept as the
document ``requests.report_document`` makes (the report's JSON Schema shape), the one the API
message is built from, so a cache hit sends what a fresh run sent. A report written by an older
version (protobuf's JSON mapping of the message) still reads back as the same message.

Nothing here follows a symbolic link (or opens a FIFO or a device) planted inside the store:
blobs and reports are opened with ``O_NOFOLLOW`` component by component below the store's own
folders, and anything that is not a regular file counts as absent, so no byte outside the store
reaches an analysis or a message.

A checkpoint folder sent as a manifest of blobs (``ModelRef.folder``) becomes
``<root>/folders/<manifest digest>/``: a folder of hard links to the stored blobs under the
manifest's file names, so nothing is copied; it is built in ``<root>/tmp`` and renamed into place.

Garbage collection removes the least recently used blobs and reports (a file's mtime is
touched whenever it is used) by age and by total size, but never a blob that a queued or
running analysis holds (``acquire``/``release`` count those references). A folder goes with the
first of its blobs that goes (or by age), unless an analysis holds it.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import unquote, urlsplit

from curvscope._files import FOLDER_FILE, folder_files, manifest_digest

from . import metrics
from .errors import InvalidInput, NotFound, PermissionDenied, ResourceExhausted

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"[0-9a-f]{64}")
# A path the kernel could resolve is at most PATH_MAX (4096) bytes; a longer URI names no file.
MAX_URI_CHARS = 4096
# C0 controls and DEL: never part of a file name we accept, and urlsplit silently drops some.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Files in one checkpoint folder: a config, an index and its shards (a 405B Llama has 191).
MAX_FOLDER_FILES = 512


@dataclass(frozen=True)
class BlobInfo:
    sha256: str
    size_bytes: int


def _shown(text: str, limit: int = 100) -> str:
    """``text`` quoted for a one-line message: control characters escaped, long text cut."""
    cut = text if len(text) <= limit else text[:limit] + "..."
    return repr(cut)


def check_digest(sha256: str) -> str:
    """Return the digest if it is 64 lower-case hex digits, else raise InvalidInput."""
    # fullmatch: with match and "$", a digest followed by a newline would pass.
    if not _DIGEST.fullmatch(sha256 or ""):
        raise InvalidInput(f"{_shown(sha256 or '')} is not a sha256 digest (64 lower-case hex digits)")
    return sha256


def _open_in(base: Path, *names: str) -> int | None:
    """A read-only descriptor of the regular file ``base/names...``, or None when there is none.

    No component below ``base`` is followed if it is a symbolic link, and a FIFO or device is
    never opened blocking: whatever is not a regular file is reported and treated as absent."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(base, flags | os.O_DIRECTORY)
    try:
        for name in names[:-1]:
            inner = os.open(name, flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        found = os.open(names[-1], flags | os.O_NONBLOCK, dir_fd=fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        log.warning("ignoring %s in the store: a symbolic link, not a file", "/".join(names))
        return None
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(found).st_mode):
        os.close(found)
        log.warning("ignoring %s in the store: not a regular file", "/".join(names))
        return None
    return found


def _is_regular(path: Path) -> bool:
    """Whether ``path`` itself (not what a link there points to) is a regular file."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


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
        self._store.shard_dir(final)
        # A link or anything else planted under this name is replaced by the verified file.
        if _is_regular(final):
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


def sha256_of_file(path: Path) -> str:
    """Lower-case hex sha256 of a file (a ``file://`` input's digest), read in chunks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def path_of_file_uri(uri: str) -> Path:
    """The absolute path a ``file://`` URI names; INVALID_ARGUMENT naming what is wrong with a bad one."""
    if len(uri) > MAX_URI_CHARS:
        raise InvalidInput(f"the URI is {len(uri)} characters long; the limit is {MAX_URI_CHARS}")
    if _CONTROL.search(uri):
        raise InvalidInput(f"the URI {_shown(uri)} contains a control character; percent-encode the path")
    try:
        parsed = urlsplit(uri)
    except ValueError as error:  # e.g. an unclosed "[" in the host part
        raise InvalidInput(f"{_shown(uri)} is not a valid URI ({error})") from None
    if parsed.scheme != "file":
        raise InvalidInput(f"unsupported URI {_shown(uri)}: use a file:// URI under a model root, or upload the file")
    if parsed.netloc not in ("", "localhost"):
        raise InvalidInput(f"{_shown(uri)} names the host {_shown(parsed.netloc)}; write file:///PATH for a path on the server")
    if parsed.query or parsed.fragment or not parsed.path.startswith("/"):
        raise InvalidInput(f"{_shown(uri)} is not file:///ABSOLUTE/PATH (no query, no fragment)")
    try:
        text = unquote(parsed.path, errors="strict")
    except UnicodeDecodeError:
        raise InvalidInput(f"{_shown(uri)} has percent escapes that are not UTF-8") from None
    if _CONTROL.search(text):
        raise InvalidInput(f"{_shown(uri)} encodes a control character (such as %00) in its path")
    return Path(text)


def folder_digest(folder: Path, roots: Iterable[Path] = ()) -> str:
    """The digest of a checkpoint folder on disk (``curvscope._files.manifest_digest`` of the
    files curvscope reads); with ``roots``, each file must resolve inside one of them."""
    files = folder_files(folder)
    if len(files) > MAX_FOLDER_FILES:
        raise InvalidInput(f"the folder holds {len(files)} checkpoint files; the limit is {MAX_FOLDER_FILES}")
    roots = list(roots)
    for name, path in files.items():
        if roots and not any(path.resolve().is_relative_to(root) for root in roots):
            raise PermissionDenied(f"{name} in {_shown(str(folder))} links outside the server's model roots")
    return manifest_digest({name: sha256_of_file(path) for name, path in files.items()})


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
        self.folders_dir = self.root / "folders"
        self.folders_dir.mkdir(parents=True, exist_ok=True)
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
        for stale in self.tmp_dir.glob("folder-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def path_for(self, sha256: str) -> Path:
        return self.blobs_dir / sha256[:2] / sha256

    # -- bookkeeping --------------------------------------------------------------------------
    @staticmethod
    def touch(path: Path) -> None:
        """Mark a file as used now (the GC removes the least recently used first)."""
        try:
            os.utime(path, follow_symlinks=False)
        except FileNotFoundError:
            pass

    @staticmethod
    def shard_dir(path: Path) -> None:
        """Create the folder of a blob or report, replacing anything there that is not a folder
        of ours (a link to a folder elsewhere would put files outside the store)."""
        shard = path.parent
        try:
            os.mkdir(shard)
        except FileExistsError:
            if stat.S_ISDIR(os.lstat(shard).st_mode):
                return
            log.warning("replacing %s in the store: not a folder", shard.name)
            os.unlink(shard)
            os.mkdir(shard)

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
        """(path, size, mtime) of every blob or report, and of any link planted among them (so
        the GC removes it); never descending into a linked folder, whose files are not ours."""
        directory = self.blobs_dir if kind == "blobs" else self.results_dir
        for shard in os.scandir(directory):
            if not shard.is_dir(follow_symlinks=False):
                continue
            try:
                entries = list(os.scandir(shard.path))
            except FileNotFoundError:  # removed while listing
                continue
            for entry in entries:
                if kind == "results" and not entry.name.endswith(".json"):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISDIR(info.st_mode):
                    yield Path(entry.path), info.st_size, info.st_mtime

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
        removed += self._gc_folders(now)
        if removed:
            log.info("store gc removed %d files (%d bytes); %d bytes left", removed, removed_bytes, total)
        return GcResult(removed, removed_bytes, kept)

    def _gc_folders(self, now: float) -> int:
        """Remove the folders no analysis holds that are older than ``max_age_seconds`` or that
        link a blob the store no longer has (its last link is the folder's: the blob was removed,
        and the folder would keep its bytes on disk)."""
        removed = 0
        for entry in os.scandir(self.folders_dir):
            try:
                info = entry.stat(follow_symlinks=False)
                links = [os.lstat(file.path).st_nlink for file in os.scandir(entry.path)] \
                    if stat.S_ISDIR(info.st_mode) else []
            except FileNotFoundError:
                continue
            too_old = self.max_age_seconds and now - info.st_mtime > self.max_age_seconds
            orphaned = any(count < 2 for count in links)
            if not stat.S_ISDIR(info.st_mode) or too_old or orphaned:
                with self._lock:
                    if self._in_use[entry.name] > 0:
                        continue
                    _remove(Path(entry.path))
                removed += 1
        return removed

    # -- reports ------------------------------------------------------------------------------
    def _result_path(self, key: str) -> Path:
        return self.results_dir / key[:2] / f"{check_digest(key)}.json"

    def get_result(self, key: str) -> dict[str, Any] | None:
        """The cached report for ``key``, or None."""
        path = self._result_path(key)
        fd = _open_in(self.results_dir, path.parent.name, path.name)
        if fd is None:  # absent, or a link planted there: recompute; put_result replaces it
            return None
        try:
            with os.fdopen(fd, "rb") as handle:
                report = json.loads(handle.read())
        except (OSError, ValueError, RecursionError):
            # Written atomically, so this is damage from outside: drop it and recompute.
            log.warning("dropping unreadable cached report %s", path.name)
            path.unlink(missing_ok=True)
            return None
        self.touch(path)
        return report

    def put_result(self, key: str, report: dict[str, Any]) -> None:
        """Store a report atomically (temporary file, fsync, rename)."""
        path = self._result_path(key)
        self.shard_dir(path)
        text = json.dumps(report, allow_nan=False, separators=(",", ":")).encode()
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="result-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            existed = os.path.lexists(path)
            os.replace(name, path)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        if not existed:
            self.add_bytes("results", len(text))

    def writer(self, sha256: str, size_bytes: int, max_bytes: int) -> BlobWriter:
        return BlobWriter(self, sha256, size_bytes, max_bytes)

    def stat(self, sha256: str) -> BlobInfo:
        """Size of a stored blob. NOT_FOUND also for a link or other non-file planted under its
        name: the client then uploads the blob again, and the upload replaces what was there."""
        path = self.path_for(check_digest(sha256))
        fd = _open_in(self.blobs_dir, path.parent.name, path.name)
        if fd is None:
            raise NotFound(f"no blob with sha256 {sha256} on this server; upload it first")
        try:
            return BlobInfo(sha256, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    def resolve_blob(self, sha256: str) -> Path:
        self.stat(sha256)
        path = self.path_for(sha256)
        self.touch(path)
        return path

    def resolve_folder(self, files: Mapping[str, str]) -> tuple[Path, str]:
        """The folder of a manifest (file name -> blob digest) and the manifest's digest: hard
        links to the stored blobs under <root>/folders/<digest>/. Names are plain checkpoint file
        names (``curvscope._files.FOLDER_FILE``); every blob must be stored (NOT_FOUND naming it)."""
        if not files:
            raise InvalidInput("the folder manifest names no files; send config.json and model.safetensors")
        if len(files) > MAX_FOLDER_FILES:
            raise InvalidInput(f"the folder manifest names {len(files)} files; the limit is {MAX_FOLDER_FILES}")
        for name, sha256 in files.items():
            if not FOLDER_FILE.fullmatch(name):
                raise InvalidInput(
                    f"the folder manifest names the file {_shown(name, 60)}; a checkpoint folder holds only config.json, "
                    "model.safetensors, model.safetensors.index.json and model-NNNNN-of-NNNNN.safetensors")
            check_digest(sha256)
            if _open_in(self.blobs_dir, sha256[:2], sha256) is None:
                raise NotFound(f"{name} of the folder (blob {sha256}) is not on this server; upload it first")
        digest = manifest_digest(files)
        folder = self.folders_dir / digest
        if not self._folder_holds(folder, files):
            self._build_folder(folder, files)
        self.touch(folder)
        for sha256 in files.values():
            self.touch(self.path_for(sha256))
        return folder, digest

    @staticmethod
    def _folder_holds(folder: Path, files: Mapping[str, str]) -> bool:
        try:
            present = {entry.name: entry for entry in os.scandir(folder)}
        except (FileNotFoundError, NotADirectoryError):
            return False
        # a blob never changes once stored, so a link of the right name is the right content
        return present.keys() == files.keys() and all(e.is_file(follow_symlinks=False) for e in present.values())

    def _build_folder(self, folder: Path, files: Mapping[str, str]) -> None:
        building = Path(tempfile.mkdtemp(dir=self.tmp_dir, prefix="folder-"))
        try:
            for name, sha256 in files.items():
                try:
                    os.link(self.path_for(sha256), building / name, follow_symlinks=False)
                except OSError:  # a file system without hard links: a copy
                    shutil.copyfile(self.path_for(sha256), building / name, follow_symlinks=False)
            if os.path.lexists(folder):
                _remove(folder)  # damaged, or not a folder of ours
            try:
                os.rename(building, folder)
            except OSError:
                if not self._folder_holds(folder, files):  # another request built it meanwhile
                    raise
        finally:
            shutil.rmtree(building, ignore_errors=True)

    def resolve_uri(self, uri: str) -> Path:
        """A ``file://`` URI inside one of the model roots, resolved without following it out:
        a regular file, or a folder (a checkpoint folder, whose files ``folder_digest`` checks).
        Malformed URIs are INVALID_ARGUMENT, paths outside the roots PERMISSION_DENIED."""
        named = path_of_file_uri(uri)
        if not self.model_roots:
            raise PermissionDenied("this server has no model roots configured; upload the file instead")
        path = named.resolve()
        if not any(path.is_relative_to(root) for root in self.model_roots):
            raise PermissionDenied(f"{_shown(uri)} is outside the server's model roots")
        try:
            mode = path.stat().st_mode
            regular = stat.S_ISREG(mode) or stat.S_ISDIR(mode)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{_shown(uri)} does not exist on the server") from None
        except PermissionError:
            raise PermissionDenied(f"the server may not read {_shown(uri)}") from None
        except OSError as error:  # a name too long for the file system, a loop of links...
            raise InvalidInput(f"{_shown(uri)} cannot be opened on the server: {error.strerror}") from None
        if not regular:
            raise NotFound(f"{_shown(uri)} is not a regular file or folder on the server")
        return path


def _remove(path: Path) -> None:
    """Remove a file, a link or a folder of the store's own."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        Path(path).unlink(missing_ok=True)

