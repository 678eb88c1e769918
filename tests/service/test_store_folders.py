"""Checkpoint folders in the store: a manifest of stored blobs becomes a folder of hard links to
them (nothing copied), held against garbage collection while used, removed with its blobs."""

from __future__ import annotations

import hashlib
import os

import pytest

from curvscope._files import manifest_digest
from curvscope_service.errors import InvalidInput, NotFound
from curvscope_service.store import BlobStore


def _put(store: BlobStore, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    writer = store.writer(digest, len(data), max_bytes=1 << 20)
    writer.write(data)
    writer.commit()
    return digest


@pytest.fixture
def store(tmp_path) -> BlobStore:
    return BlobStore(tmp_path / "s", max_bytes=250)


def test_a_manifest_becomes_a_folder_of_links(store):
    files = {"config.json": _put(store, b"{}" * 50), "model.safetensors": _put(store, b"w" * 100)}
    folder, digest = store.resolve_folder(files)
    assert digest == manifest_digest(files) and folder.name == digest
    for name, sha256 in files.items():
        assert os.stat(folder / name).st_ino == os.stat(store.path_for(sha256)).st_ino  # a link, not a copy
    again, _ = store.resolve_folder(files)
    assert again == folder and sorted(p.name for p in folder.iterdir()) == sorted(files)


def test_a_damaged_folder_is_rebuilt(store):
    files = {"config.json": _put(store, b"{}"), "model.safetensors": _put(store, b"w" * 10)}
    folder, _ = store.resolve_folder(files)
    (folder / "model.safetensors").unlink()
    (folder / "extra").write_text("planted")
    rebuilt, _ = store.resolve_folder(files)
    assert sorted(p.name for p in rebuilt.iterdir()) == sorted(files)


def test_gc_removes_a_folder_with_its_blob_unless_held(store):
    config = _put(store, b"{}" * 50)
    files = {"config.json": config, "model.safetensors": _put(store, b"w" * 100)}
    folder, digest = store.resolve_folder(files)
    store.acquire([digest])
    _put(store, b"x" * 100)  # over max_bytes: the oldest blobs go
    os.utime(store.path_for(config), (1, 1))
    store.gc()
    assert not store.path_for(config).exists()
    assert folder.exists()  # held by an analysis: its links keep the bytes it reads
    store.release([digest])
    store.gc()
    assert not folder.exists()
    with pytest.raises(NotFound, match="config.json of the folder"):
        store.resolve_folder(files)


def test_stale_folders_in_progress_are_cleaned_at_start(tmp_path):
    store = BlobStore(tmp_path / "s")
    (store.tmp_dir / "folder-abc").mkdir()
    (store.tmp_dir / "folder-abc" / "config.json").write_text("{}")
    BlobStore(tmp_path / "s")
    assert not (store.tmp_dir / "folder-abc").exists()


@pytest.mark.parametrize("files, fragment", [
    ({}, "names no files"),
    ({"../config.json": "0" * 64}, "holds only config.json"),
    ({"config.json": "XYZ"}, "not a sha256 digest"),
    ({f"model-{i:05d}-of-01000.safetensors": "0" * 64 for i in range(600)}, "the limit is 512"),
])
def test_bad_manifests(store, files, fragment):
    with pytest.raises(InvalidInput, match=fragment):
        store.resolve_folder(files)
