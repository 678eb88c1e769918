"""Store garbage collection: by age and by size, least recently used first, never a blob that a
queued or running analysis holds; cached reports are written atomically and survive restarts."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from curvscope_service.errors import InvalidInput, NotFound
from curvscope_service.store import BlobStore, result_key


def _put(store: BlobStore, data: bytes, age_seconds: float = 0.0) -> str:
    digest = hashlib.sha256(data).hexdigest()
    writer = store.writer(digest, len(data), max_bytes=1 << 20)
    writer.write(data)
    writer.commit()
    if age_seconds:
        stamp = time.time() - age_seconds
        os.utime(store.path_for(digest), (stamp, stamp))
    return digest


def _present(store: BlobStore, digest: str) -> bool:
    try:
        store.stat(digest)
        return True
    except NotFound:
        return False


def test_gc_by_age_keeps_recent_and_held_blobs(tmp_path):
    store = BlobStore(tmp_path / "s", max_age_seconds=3600)
    old, held, recent = (_put(store, bytes([i]) * 100, age) for i, age in ((1, 7200), (2, 7200), (3, 10)))
    store.acquire([held])
    outcome = store.gc()
    assert (outcome.removed_files, outcome.removed_bytes, outcome.kept_in_use) == (1, 100, 1)
    assert not _present(store, old) and _present(store, held) and _present(store, recent)
    assert store.size_bytes == 200
    store.release([held])
    assert store.in_use() == set()
    store.gc()
    assert not _present(store, held) and store.size_bytes == 100


def test_gc_by_size_removes_least_recently_used_first(tmp_path):
    store = BlobStore(tmp_path / "s", max_bytes=250)
    digests = [_put(store, bytes([i]) * 100, age_seconds=100 - 10 * i) for i in range(4)]  # 0 is the oldest
    # Using a blob makes it recent: 0 survives; 1 is the oldest but held, so 2 and 3 go.
    store.resolve_blob(digests[0])
    store.acquire([digests[1]] * 2)  # two analyses hold it
    store.release([digests[1]])
    outcome = store.gc()
    assert [_present(store, d) for d in digests] == [True, True, False, False]
    assert outcome.kept_in_use == 1 and store.size_bytes == 200
    store.release([digests[1]])
    newest = _put(store, b"n" * 100)
    store.gc()  # 300 bytes: the oldest, no longer held, goes
    assert [_present(store, d) for d in (*digests, newest)] == [True, False, False, False, True]
    assert store.size_bytes == 200


def test_reports_are_atomic_counted_collected_and_survive_restarts(tmp_path):
    store = BlobStore(tmp_path / "s", max_age_seconds=3600)
    key = result_key({"model": "a" * 64, "analyses": [["hessian_eigen", {"top_k": 2}]]})
    assert key != result_key({"model": "a" * 64, "analyses": [["hessian_eigen", {"top_k": 3}]]})
    assert key == result_key({"analyses": [["hessian_eigen", {"top_k": 2}]], "model": "a" * 64})
    assert store.get_result(key) is None
    report = {"schema": "curvscope.report/v1", "seconds": 1.5, "results": {"hessian_eigen": {"largest": [2.0]}}}
    store.put_result(key, report)
    assert list(store.tmp_dir.iterdir()) == []
    (store.tmp_dir / "result-crashed").write_bytes(b"{partial")  # a write cut short by a SIGKILL
    reopened = BlobStore(tmp_path / "s", max_age_seconds=3600)
    assert reopened.get_result(key) == report and list(reopened.tmp_dir.iterdir()) == []
    size = len((reopened.results_dir / key[:2] / f"{key}.json").read_bytes())
    assert reopened.size_bytes == size
    stamp = time.time() - 7200
    os.utime(reopened.results_dir / key[:2] / f"{key}.json", (stamp, stamp))
    assert reopened.gc().removed_files == 1 and reopened.get_result(key) is None and reopened.size_bytes == 0
    with pytest.raises(InvalidInput):
        reopened.get_result("../../etc/passwd")


def test_a_damaged_report_is_dropped_not_served(tmp_path):
    store = BlobStore(tmp_path / "s")
    key = result_key({"k": 1})
    store.put_result(key, {"seconds": 1.0})
    path = store.results_dir / key[:2] / f"{key}.json"
    path.write_text("{not json")
    assert store.get_result(key) is None and not path.exists()


def test_blobs_of_a_running_analysis_are_kept_by_the_server(tmp_path, digits_files):
    import threading

    import grpc
    from safetensors.torch import load_file, save_file

    from curvscope import Client
    from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb
    from curvscope._proto.curvscope.v1 import curvscope_pb2_grpc as pb_grpc
    from curvscope_service.config import ServerConfig
    from curvscope_service.in_process import InProcessServer

    data = load_file(str(digits_files[1]))
    big = tmp_path / "big.safetensors"
    save_file({"inputs": data["inputs"].repeat(8, 1), "targets": data["targets"].repeat(8)}, str(big))
    config = ServerConfig(store=tmp_path / "store", store_max_bytes=1, gc_interval_seconds=3600)
    with InProcessServer(config) as server, Client(server.target) as client:
        store = server.running.store
        request = pb.AnalyzeRequest(
            model=client.model_ref(digits_files[0]), data=client.data_ref(big), loss="cross_entropy",
            options=pb.AnalysisOptions(micro_batch_size=128),
            analyses=[pb.AnalysisSpec(hessian_eigen=pb.HessianEigenSpec(top_k=40, tolerance=1e-9, max_hvps=2000))])
        digests = [request.model.blob.sha256, request.data.blob.sha256]
        with grpc.insecure_channel(server.target) as channel:
            call = pb_grpc.CurvscopeStub(channel).Analyze(request)
            for event in call:
                if event.HasField("progress"):
                    break
            assert store.gc().kept_in_use == 2  # the store is over its 1-byte cap, the blobs stay
            assert all(_present(store, d) for d in digests)
            call.cancel()
        deadline = time.monotonic() + 30
        while store.in_use() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.in_use() == set()
        store.gc()
        assert not any(_present(store, d) for d in digests) and store.size_bytes == 0
