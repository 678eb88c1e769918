"""Content-addressed blob store on disk.

Blobs live at ``<root>/blobs/sha256/<first two hex digits>/<digest>``. An upload is written to
a temporary file under ``<root>/tmp`` and renamed into place only after its digest and size
are verified, so a broken, cancelled or oversize upload leaves nothing behind and a blob that
is present is always complete. The same digest uploaded twice is stored once.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from .errors import InvalidInput, NotFound, PermissionDenied, ResourceExhausted

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

    def write(self, data: bytes) -> None:
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
        else:
            os.chmod(self._tmp_path, 0o444)
            os.replace(self._tmp_path, final)
        return BlobInfo(digest, self._size)

    def abort(self) -> None:
        """Drop the partial upload; safe to call more than once and after commit."""
        if not self._file.closed:
            self._file.close()
        self._tmp_path.unlink(missing_ok=True)


class BlobStore:
    """Blobs by sha256, plus read-only model roots that ``file://`` URIs may point into."""

    def __init__(self, root: Path, model_roots: list[Path] | None = None):
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        self.model_roots = [Path(r).resolve() for r in (model_roots or [])]
        self._clean_stale_uploads()

    def _clean_stale_uploads(self) -> None:
        # A server killed mid-upload leaves a temporary file; it was never a blob.
        for stale in self.tmp_dir.glob("upload-*"):
            stale.unlink(missing_ok=True)

    def path_for(self, sha256: str) -> Path:
        return self.root / "blobs" / "sha256" / sha256[:2] / sha256

    def writer(self, sha256: str, size_bytes: int, max_bytes: int) -> BlobWriter:
        return BlobWriter(self, sha256, size_bytes, max_bytes)

    def stat(self, sha256: str) -> BlobInfo:
        path = self.path_for(check_digest(sha256))
        if not path.is_file():
            raise NotFound(f"no blob with sha256 {sha256} on this server; upload it first")
        return BlobInfo(sha256, path.stat().st_size)

    def resolve_blob(self, sha256: str) -> Path:
        self.stat(sha256)
        return self.path_for(sha256)

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

