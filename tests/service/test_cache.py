"""Result cache: a repeated request is answered from the store, identical requests in flight share
one computation, a caller that leaves does not stop the others, and reports survive a restart."""

from __future__ import annotations

import math
import threading
import time

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from curvscope import Client
from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb
from curvscope._proto.curvscope.v1 import curvscope_pb2_grpc as pb_grpc
from curvscope_service import engine, metrics
from curvscope_service.memory_plan import CALIBRATION_PRODUCTS
from curvscope_service.config import ServerConfig
from curvscope_service.in_process import InProcessServer
from curvscope_service.loading import load_data, load_model
from curvscope_service.losses import get_loss
from curvscope_service.requests import report_document, report_message
from curvscope_service.store import BlobStore
from dense_reference import dense_hessian


def _count(counter, *labels) -> float:
    return counter.labels(*labels)._value.get()


def _wait_for(condition, what: str, seconds: float = 300) -> None:
    """Poll until ``condition()``; the bound only turns a hang into a failure, it times nothing."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {seconds:g} s"
        time.sleep(0.01)


@pytest.fixture
def hold_after_first_progress(monkeypatch):
    """The server's analyses stop after their first progress message (which is sent) until the
    returned event is set, or every caller left, so a test can act while one is certainly in flight."""
    resume = threading.Event()
    run_analysis = engine.run_analysis

    def held(*args, progress, check, **kwargs):
        def report(message):
            progress(message)
            while not resume.wait(0.01):
                check()  # raises once every caller went away
        return run_analysis(*args, progress=report, check=check, **kwargs)

    monkeypatch.setattr(engine, "run_analysis", held)
    yield resume
    resume.set()


@pytest.fixture(scope="module")
def slow_data(digits_files, tmp_path_factory):
    """The digits batch repeated to 4096 samples: each product takes a noticeable time."""
    data = load_file(str(digits_files[1]))
    path = tmp_path_factory.mktemp("slow") / "slow.safetensors"
    save_file({"inputs": data["inputs"].repeat(8, 1), "targets": data["targets"].repeat(8)}, str(path))
    return path


def _events(call) -> list[pb.AnalyzeEvent]:
    return list(call)


def test_repeated_request_is_answered_from_the_cache(tmp_path, digits_files):
    model_path, data_path = digits_files
    with InProcessServer(ServerConfig(store=tmp_path / "store")) as server, Client(server.target) as client:
        first_events = []
        first = client.analyze(model_path, data_path, eigen=2, seed=3, progress=first_events.append)
        hits, hvps = _count(metrics.CACHE_REQUESTS, "hit"), _count(metrics.HVPS, "cpu", "hessian")
        again_events = []
        again = client.analyze(model_path, data_path, eigen=2, seed=3, progress=again_events.append)
        # The same report (its original timing included), no queueing, no device work.
        assert again.message == first.message
        assert again_events == [] and any(e.HasField("queued") for e in first_events)
        assert _count(metrics.CACHE_REQUESTS, "hit") == hits + 1
        assert _count(metrics.HVPS, "cpu", "hessian") == hvps
        # Options written differently but equal once defaults are filled in share the entry;
        # a different seed is a different request.
        explicit = client.analyze(model_path, data_path, eigen=2, seed=3, tolerance=1e-3)
        assert explicit.message == first.message
        other = client.analyze(model_path, data_path, eigen=2, seed=4)
        assert other.message != first.message
    model = load_model(model_path, dtype=torch.float64)
    data = load_data(data_path, dtype=torch.float64)
    truth = torch.linalg.eigvalsh(dense_hessian(model.module, data.inputs, data.targets, get_loss("cross_entropy")))
    torch.testing.assert_close(torch.tensor(list(again.results.hessian_eigen.largest), dtype=torch.float64),
                               truth.flip(0)[:2], rtol=1e-3, atol=0)


def test_reports_survive_a_restart(tmp_path, digits_files):
    model_path, data_path = digits_files
    config = ServerConfig(store=tmp_path / "store")
    with InProcessServer(config) as server, Client(server.target) as client:
        first = client.analyze(model_path, data_path, eigen=1, seed=5)
    with InProcessServer(ServerConfig(store=tmp_path / "store")) as server, Client(server.target) as client:
        events = []
        again = client.analyze(model_path, data_path, eigen=1, seed=5, progress=events.append)
    assert again.message == first.message and events == []
    assert again.message.SerializeToString(deterministic=True) == first.message.SerializeToString(deterministic=True)
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


def test_a_cached_report_is_the_message_a_fresh_run_sends(tmp_path):
    """The store keeps the report document that the fresh message is built from, so a cache hit
    sends the same bytes, an infinite bound, a zero and an unset flag included."""
    report = {"schema": engine.REPORT_SCHEMA, "device": "cpu", "seconds": 0.5, "results": {
        "lipschitz": {"lower": 0.0, "upper": math.inf, "method": "interval"},
        "hessian_eigen": {"largest": [-math.inf, 1.0], "smallest": [], "converged": False, "hvps": 7}}}
    key = "ab" * 32
    BlobStore(tmp_path / "store").put_result(key, report_document(report))
    stored = BlobStore(tmp_path / "store").get_result(key)
    assert stored == report_document(report) and stored["results"]["lipschitz"]["upper"] == "Infinity"
    fresh, cached = report_message(report_document(report)), report_message(stored)
    assert cached == fresh and cached.results.lipschitz.upper == math.inf
    assert cached.SerializeToString(deterministic=True) == fresh.SerializeToString(deterministic=True)


def _start(server, request, events: list, done: threading.Event, outcome: dict, name: str) -> grpc.Future:
    channel = grpc.insecure_channel(server.target)
    call = pb_grpc.CurvscopeStub(channel).Analyze(request)

    def read():
        try:
            for event in call:
                events.append(event)
            outcome[name] = "ok"
        except grpc.RpcError as error:
            outcome[name] = error.code().name
        finally:
            done.set()
            channel.close()
    threading.Thread(target=read, daemon=True).start()
    return call


def _request(client, model_path, data_path, seed) -> pb.AnalyzeRequest:
    return pb.AnalyzeRequest(
        model=client.model_ref(model_path), data=client.data_ref(data_path), loss="cross_entropy",
        options=pb.AnalysisOptions(micro_batch_size=128, seed=seed),
        analyses=[pb.AnalysisSpec(hessian_eigen=pb.HessianEigenSpec(top_k=2, tolerance=1e-9, max_hvps=24))])


def test_identical_requests_in_flight_share_one_computation(tmp_path, digits_files, slow_data,
                                                            hold_after_first_progress):
    model_path = digits_files[0]
    analyze = "/curvscope.v1.Curvscope/Analyze"
    with InProcessServer(ServerConfig(store=tmp_path / "store")) as server, Client(server.target) as client:
        request = _request(client, model_path, slow_data, seed=21)
        shared_before = _count(metrics.CACHE_REQUESTS, "shared")
        hvps_before = _count(metrics.HVPS, "cpu", "hessian")
        cancelled_before = _count(metrics.REQUESTS, analyze, "CANCELLED")
        events = {name: [] for name in "abc"}
        done = {name: threading.Event() for name in "abc"}
        outcome: dict[str, str] = {}
        calls = {"a": _start(server, request, events["a"], done["a"], outcome, "a")}
        # The others join while the first one's work is held after its first progress message:
        # certainly running, and certainly not finished before the first caller leaves.
        _wait_for(lambda: any(e.HasField("progress") for e in events["a"]), "progress of the first call")
        calls["b"] = _start(server, request, events["b"], done["b"], outcome, "b")
        calls["c"] = _start(server, request, events["c"], done["c"], outcome, "c")
        _wait_for(lambda: _count(metrics.CACHE_REQUESTS, "shared") == shared_before + 2, "two callers joining")
        calls["a"].cancel()  # the first caller leaves: the others' work goes on
        _wait_for(lambda: _count(metrics.REQUESTS, analyze, "CANCELLED") == cancelled_before + 1,
                  "the server ending the first call")
        hold_after_first_progress.set()
        for name in "abc":
            assert done[name].wait(300), name
        assert outcome == {"a": "CANCELLED", "b": "ok", "c": "ok"}
        reports = [events[name][-1].report for name in "bc"]
        assert reports[0] == reports[1] and reports[0].results.hessian_eigen.hvps == 24
        assert _count(metrics.CACHE_REQUESTS, "shared") == shared_before + 2
        # One computation: the budget of one solve (and the memory plan's calibration), not three.
        assert _count(metrics.HVPS, "cpu", "hessian") - hvps_before == 24 + CALIBRATION_PRODUCTS
        assert any(e.HasField("progress") for e in events["b"])


def test_the_work_stops_when_every_sharing_caller_left(tmp_path, digits_files, slow_data):
    model_path = digits_files[0]
    with InProcessServer(ServerConfig(store=tmp_path / "store")) as server, Client(server.target) as client:
        request = _request(client, model_path, slow_data, seed=22)
        request.analyses[0].hessian_eigen.max_hvps = 2000  # minutes unless stopped
        events = {name: [] for name in "ab"}
        done = {name: threading.Event() for name in "ab"}
        outcome: dict[str, str] = {}
        hvps_before = _count(metrics.HVPS, "cpu", "hessian")
        calls = {name: _start(server, request, events[name], done[name], outcome, name) for name in "ab"}
        _wait_for(lambda: all(any(e.HasField("progress") for e in events[n]) for n in "ab"), "progress of both calls")
        for call in calls.values():
            call.cancel()
        assert all(done[name].wait(300) for name in "ab")
        # The worker is free again: a quick request runs after the shared work, which stopped
        # long before its 2,000 products (the counter takes a job's products when it ends).
        report = client.analyze(model_path, digits_files[1], eigen=1, seed=23)
        assert report.results.hessian_eigen.converged
        stopped_after = _count(metrics.HVPS, "cpu", "hessian") - hvps_before - report.results.hessian_eigen.hvps
        assert 0 < stopped_after < 2000
