"""Faults on loopback: a client killed mid-upload leaves no partial blob; a server SIGKILLed in
the middle of an analysis (and of an upload) restarts on an intact store."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import grpc
from safetensors.torch import load_file, save_file

from curvscope import Client
from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb
from curvscope._proto.curvscope.v1 import curvscope_pb2_grpc as pb_grpc
from curvscope_service.server import ServerProcess

# Sends the header and a few chunks of a 64 MiB upload, says so, then stalls until killed.
STALLED_UPLOADER = """
import sys, time, grpc
from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb, curvscope_pb2_grpc as pb_grpc
target = sys.argv[1]
def chunks():
    yield pb.UploadChunk(header=pb.UploadHeader(sha256="c" * 64, size_bytes=64 << 20))
    for _ in range(3):
        yield pb.UploadChunk(data=b"x" * (1 << 20))
    print("sent", flush=True)
    time.sleep(3600)
pb_grpc.CurvscopeStub(grpc.insecure_channel(target)).Upload(chunks())
"""


def _wait_for(predicate, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _stalled_upload(target: str) -> subprocess.Popen:
    uploader = subprocess.Popen([sys.executable, "-c", STALLED_UPLOADER, target], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
    assert uploader.stdout.readline().strip() == "sent"
    return uploader


def _partials(store: Path) -> list[Path]:
    return list((store / "tmp").iterdir())


def test_a_client_killed_mid_upload_leaves_nothing(tmp_path, digits_files):
    store = tmp_path / "store"
    with ServerProcess(["--store", str(store)]) as server, Client(server.target) as client:
        kept = client.upload(digits_files[0])
        uploader = _stalled_upload(server.target)
        assert _wait_for(lambda: _partials(store))  # the partial upload is on disk...
        uploader.kill()
        uploader.wait(10)
        assert _wait_for(lambda: not _partials(store))  # ...and gone once the stream broke
        assert client.stat("c" * 64) is None and client.stat(kept).size_bytes > 0
        assert [p.name for p in (store / "blobs" / "sha256").rglob("*") if p.is_file()] == [kept]


def _blob_files(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (store / "blobs" / "sha256").rglob("*") if p.is_file()}


def test_a_server_killed_mid_analysis_restarts_on_an_intact_store(tmp_path, digits_files):
    model_path, data_path = digits_files
    store = tmp_path / "store"
    data = load_file(str(data_path))
    big = tmp_path / "big.safetensors"
    save_file({"inputs": data["inputs"].repeat(8, 1), "targets": data["targets"].repeat(8)}, str(big))

    server = ServerProcess(["--store", str(store)])
    try:
        client = Client(server.target)
        cached = client.analyze(model_path, data_path, eigen=2, seed=41)
        request = pb.AnalyzeRequest(
            model=client.model_ref(model_path), data=client.data_ref(big), loss="cross_entropy",
            options=pb.AnalysisOptions(micro_batch_size=128),
            analyses=[pb.AnalysisSpec(hessian_eigen=pb.HessianEigenSpec(top_k=40, tolerance=1e-9, max_hvps=2000))])
        channel = grpc.insecure_channel(server.target)
        call = pb_grpc.CurvscopeStub(channel).Analyze(request)
        for event in call:
            if event.HasField("progress"):
                break
        uploader = _stalled_upload(server.target)
        assert _wait_for(lambda: _partials(store))
        server.kill()  # mid-analysis and mid-upload
        uploader.kill()
        client.close()
        channel.close()
    finally:
        server.stop()
    assert _partials(store)  # the kill left a partial upload behind...
    before = _blob_files(store)
    assert set(before) == {request.model.blob.sha256, request.data.blob.sha256, cached.message.data.sha256}

    with ServerProcess(["--store", str(store)]) as restarted, Client(restarted.target) as client:
        assert not _partials(store)  # ...which the restart removed
        after = _blob_files(store)
        assert after == before and all(hashlib.sha256(body).hexdigest() == name for name, body in after.items())
        for digest, body in after.items():
            assert client.stat(digest).size_bytes == len(body)
        events = []
        again = client.analyze(model_path, data_path, eigen=2, seed=41, progress=events.append)
        assert again.message == cached.message and events == []  # the cached report survived
        request.analyses[0].hessian_eigen.top_k, request.analyses[0].hessian_eigen.max_hvps = 2, 6
        report = client.analyze_request(request)  # the interrupted request was not cached half-done
        assert report.results.hessian_eigen.hvps == 6
