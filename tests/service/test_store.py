"""The blob store: verified, atomic, de-duplicated, and nothing left by a failed upload."""

import hashlib

import pytest

from curvscope_service.errors import InvalidInput, NotFound, PermissionDenied, ResourceExhausted
from curvscope_service.store import BlobStore


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path):
    return BlobStore(tmp_path / "store")


def _leftovers(store: BlobStore) -> list:
    return list(store.tmp_dir.iterdir())


def test_upload_is_stored_under_its_digest_and_read_only(store):
    data = b"x" * 3000
    writer = store.writer(_digest(data), len(data), max_bytes=10_000)
    writer.write(data[:1000])
    writer.write(data[1000:])
    info = writer.commit()
    assert info.sha256 == _digest(data) and info.size_bytes == 3000
    path = store.resolve_blob(info.sha256)
    assert path.read_bytes() == data
    assert not path.stat().st_mode & 0o222
    assert _leftovers(store) == []


def test_same_content_twice_is_stored_once(store):
    data = b"abc"
    for _ in range(2):
        writer = store.writer(_digest(data), 3, max_bytes=10)
        writer.write(data)
        writer.commit()
    assert len(list((store.root / "blobs").rglob("*" + _digest(data)))) == 1
    assert _leftovers(store) == []


def test_digest_mismatch_leaves_nothing(store):
    writer = store.writer(_digest(b"expected"), 8, max_bytes=100)
    writer.write(b"tampered")
    with pytest.raises(InvalidInput, match="sha256"):
        writer.commit()
    writer.abort()
    assert _leftovers(store) == []
    with pytest.raises(NotFound):
        store.stat(_digest(b"expected"))


def test_truncated_upload_is_refused(store):
    writer = store.writer(_digest(b"0123456789"), 10, max_bytes=100)
    writer.write(b"01234")
    with pytest.raises(InvalidInput, match="5 of the 10 bytes"):
        writer.commit()
    writer.abort()
    assert _leftovers(store) == []


def test_oversize_upload_is_refused_early_and_while_streaming(store):
    with pytest.raises(ResourceExhausted, match="limit"):
        store.writer(_digest(b""), 1_000, max_bytes=100)
    assert _leftovers(store) == []
    writer = store.writer(_digest(b""), 50, max_bytes=100)
    with pytest.raises(InvalidInput, match="more than"):
        writer.write(b"z" * 60)
    writer.abort()
    assert _leftovers(store) == []


def test_bad_digest_text_is_invalid(store):
    with pytest.raises(InvalidInput, match="sha256"):
        store.stat("../../etc/passwd")


def test_stale_uploads_are_cleaned_on_start(tmp_path):
    store = BlobStore(tmp_path / "s")
    (store.tmp_dir / "upload-crashed").write_bytes(b"partial")
    BlobStore(tmp_path / "s")
    assert _leftovers(store) == []


def test_uris_resolve_only_inside_model_roots(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    (root / "m.pt2").write_bytes(b"m")
    (tmp_path / "secret").write_bytes(b"s")
    store = BlobStore(tmp_path / "store", [root])
    assert store.resolve_uri((root / "m.pt2").as_uri()) == (root / "m.pt2").resolve()
    with pytest.raises(PermissionDenied):
        store.resolve_uri((tmp_path / "secret").as_uri())
    with pytest.raises(PermissionDenied):
        store.resolve_uri((root / ".." / "secret").as_uri())
    with pytest.raises(NotFound):
        store.resolve_uri((root / "missing.pt2").as_uri())
    with pytest.raises(InvalidInput, match="file://"):
        store.resolve_uri("http://example.invalid/m.pt2")
    with pytest.raises(PermissionDenied, match="no model roots"):
        BlobStore(tmp_path / "other").resolve_uri((root / "m.pt2").as_uri())
