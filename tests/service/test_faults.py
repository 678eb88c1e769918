"""Faults on loopback: a client killed mid-upload leaves no partial blob; a server SIGKILLed in
the middle of an analysis (and of an upload) restarts on an intact store; a solver process
SIGKILLed mid-solve ends its call with ABORTED and leaves the server serving; cancellation and
deadlines kill the solver process."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from curvscope import Client, CurvscopeError
from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb
from curvscope._proto.curvscope.v1 import curvscope_pb2_grpc as pb_grpc
from server_process import ServerProcess

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


# -- solver processes --------------------------------------------------------------------------

def _write_mlp(path: Path, widths: list[int], seed: int = 0) -> Path:
    import torch

    from curvscope_service.loading import save_sequential
    from curvscope_service.loading.sequential import build

    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [{"type": "relu"}] if i else []
        layers.append({"type": "linear", "in_features": a, "out_features": b})
    config = {"input_shape": [widths[0]], "layers": layers}
    torch.manual_seed(seed)
    save_sequential(path, config, build(config).state_dict())
    return path


def _lipsdp_request(client: Client, model: Path, seed: int = 0) -> pb.AnalyzeRequest:
    return pb.AnalyzeRequest(
        model=client.model_ref(model), loss="cross_entropy", options=pb.AnalysisOptions(seed=seed),
        analyses=[pb.AnalysisSpec(lipschitz=pb.LipschitzSpec(methods=[pb.LIPSCHITZ_METHOD_LIPSDP_NEURON]))])


def _solvers(server_pid: int) -> list[int]:
    """Live solver subprocesses of the server (its children running the solver worker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == server_pid and fields[0] != "Z" and b"solver_worker" in command:
            found.append(int(entry.name))
    return found


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    """The server's metrics over its metrics port: (sample name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _solver_gauge(port: int, state: str) -> float:
    return _scrape(port).get(("curvscope_solver_processes", (("state", state),)), 0.0)


def _solves(port: int, outcome: str) -> float:
    return _scrape(port).get(("curvscope_solves_total", (("outcome", outcome),)), 0.0)


def _solving(server_pid: int, metrics_port: int) -> int:
    """Wait until the server's one solver process is busy and burning CPU on a solve; its pid."""
    assert _wait_for(lambda: _solver_gauge(metrics_port, "busy") == 1)
    (worker,) = _solvers(server_pid)
    idle_cpu = _cpu_seconds(worker)
    assert _wait_for(lambda: _cpu_seconds(worker) > idle_cpu + 0.3)
    return worker


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def test_a_solver_killed_mid_solve_gives_a_clean_error(tmp_path):
    small = _write_mlp(tmp_path / "small.safetensors", [3, 10, 8, 4])
    wide = _write_mlp(tmp_path / "wide.safetensors", [16, 400, 3])  # minutes of SCS on 2 cores
    store, metrics_port = tmp_path / "store", _free_port()
    # aborted_retries=0: the client would send the killed (minutes-long) solve again
    with ServerProcess(["--store", str(store), "--metrics-port", str(metrics_port)]) as server, \
            Client(server.target, aborted_retries=0) as client, ThreadPoolExecutor(1) as pool:
        first = client.analyze_request(_lipsdp_request(client, small))  # starts a warm solver process
        assert _solver_gauge(metrics_port, "idle") == 1 and _solver_gauge(metrics_port, "busy") == 0
        wide_request = _lipsdp_request(client, wide)
        call = pool.submit(client.analyze_request, wide_request)
        worker = _solving(server.pid, metrics_port)
        os.kill(worker, signal.SIGKILL)
        error = call.exception(timeout=60)
        assert isinstance(error, CurvscopeError) and error.code == "ABORTED", error
        assert "killed by SIGKILL mid-solve" in error.message and "retry the request" in error.message
        assert _wait_for(lambda: _solver_gauge(metrics_port, "busy") == 0)
        assert _solver_gauge(metrics_port, "idle") == 0 and _solves(metrics_port, "killed") == 1
        # The server is healthy and serves the next request with a fresh solver process.
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        again = client.analyze_request(_lipsdp_request(client, small, seed=1))
        assert again.results.lipschitz.upper == first.results.lipschitz.upper > 0
        assert _solvers(server.pid) != [worker] and _solves(metrics_port, "ok") == 2
    # Nothing half-written: no temporary file, both finished reports cached, the aborted one not.
    assert not _partials(store)
    reports = [path.read_text() for path in (store / "results").rglob("*.json")]
    assert len(reports) == 2 and not any(wide_request.model.blob.sha256 in text for text in reports)


def test_cancel_and_deadline_kill_the_solver_process(tmp_path):
    small = _write_mlp(tmp_path / "small.safetensors", [3, 10, 8, 4])
    wide = _write_mlp(tmp_path / "wide.safetensors", [16, 400, 3])
    metrics_port = _free_port()
    with ServerProcess(["--store", str(tmp_path / "store"), "--metrics-port", str(metrics_port)]) as server, \
            Client(server.target) as client, ThreadPoolExecutor(1) as pool:
        client.analyze_request(_lipsdp_request(client, small))  # warm: the solve starts at once
        stub = pb_grpc.CurvscopeStub(channel := grpc.insecure_channel(server.target))

        # The client goes away mid-solve.
        events = stub.Analyze(_lipsdp_request(client, wide))
        drained = pool.submit(lambda: [event for event in events])
        worker = _solving(server.pid, metrics_port)
        events.cancel()
        with pytest.raises(grpc.RpcError) as cancelled:
            drained.result(timeout=30)
        assert cancelled.value.code() == grpc.StatusCode.CANCELLED
        assert _wait_for(lambda: _gone(worker)) and _solvers(server.pid) == []
        assert _wait_for(lambda: _solves(metrics_port, "cancelled") == 1)
        assert _solver_gauge(metrics_port, "busy") == 0

        # The client's deadline passes mid-solve (a fresh process imports cvxpy first: well
        # within the deadline, and the solve takes minutes).
        with pytest.raises(CurvscopeError) as late:
            client.analyze_request(_lipsdp_request(client, wide, seed=1), timeout=8)
        assert late.value.code == "DEADLINE_EXCEEDED"
        assert _wait_for(lambda: _solves(metrics_port, "cancelled") == 2)
        assert _solvers(server.pid) == [] and _solver_gauge(metrics_port, "busy") == 0
        channel.close()
