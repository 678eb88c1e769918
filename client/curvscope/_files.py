"""File digests and checkpoint folders, shared by the client (to skip re-uploads) and the service."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Mapping

CHUNK_BYTES = 1 << 20
# The files of a Hugging Face checkpoint folder that curvscope reads: the config, and the weights
# in one file or in shards with their index. Everything else in such a folder (tokenizer files,
# generation_config.json, a README) is never sent, and a server refuses any other name.
FOLDER_FILE = re.compile(r"config\.json|model\.safetensors(?:\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors")
# Tags the digest of a folder, so that it can never equal the digest of a single file.
_MANIFEST_TAG = b"curvscope.folder/v1\n"


def sha256_of_file(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Lower-case hex sha256 of a file, read in chunks so memory stays flat."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def folder_files(folder: str | Path) -> dict[str, Path]:
    """The files of a checkpoint folder that curvscope reads (``FOLDER_FILE``), by name."""
    return {path.name: path for path in sorted(Path(folder).iterdir())
            if FOLDER_FILE.fullmatch(path.name) and path.is_file()}


def manifest_digest(files: Mapping[str, str]) -> str:
    """The digest of a folder: sha256 over its files' names and digests, in name order. Two
    folders with the same files have the same digest, wherever they are stored."""
    digest = hashlib.sha256(_MANIFEST_TAG)
    for name in sorted(files):
        digest.update(f"{name}\t{files[name]}\n".encode())
    return digest.hexdigest()
