"""File digests, shared by the client (to skip re-uploads) and the service."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK_BYTES = 1 << 20


def sha256_of_file(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Lower-case hex sha256 of a file, read in chunks so memory stays flat."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
