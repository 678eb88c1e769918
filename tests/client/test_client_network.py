"""The thin client on a real network, on loopback: grpc's retry policy, the default deadlines,
an Analyze sent again after an ABORTED the server marks retry-safe, the wait for a connection
and the message when there is none, keepalive the server accepts.

A fake server counts the attempts each method receives, so nothing here depends on timing; the
timeouts are hang guards."""

from __future__ import annotations

import socket
import threading
from collections import Counter
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest

from curvscope import Client, CurvscopeError
from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb
from curvscope._proto.curvscope.v1 import curvscope_pb2_grpc as pb_grpc
from curvscope.cli import main
from curvscope.client import KEEPALIVE_OPTIONS, RETRY_SAFE_METADATA, SERVICE_CONFIG, UNARY_TIMEOUT_SECONDS

DIGEST = "ab" * 32
MAX_ATTEMPTS = SERVICE_CONFIG["methodConfig"][0]["retryPolicy"]["maxAttempts"]


@dataclass
class Failures:
    """The first ``count`` calls of a method fail with ``code``; ``retry_safe`` adds the mark."""
    count: int
    code: grpc.StatusCode
    retry_safe: bool = False


class FakeCurvscope(pb_grpc.CurvscopeServicer):
    """Counts every call of each method, keeps the deadline it came with, and fails the first
    ones as ``failures`` says. It has no health service (the client's connection check takes
    UNIMPLEMENTED as an answer)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.deadlines: dict[str, float | None] = {}
        self.failures: dict[str, Failures] = {}
        self.target = ""

    def _arrive(self, method: str, context: grpc.ServicerContext) -> None:
        self.calls[method] += 1
        self.deadlines[method] = context.time_remaining()

    def _fail_if_planned(self, method: str, context: grpc.ServicerContext) -> None:
        plan = self.failures.get(method)
        if plan is not None and self.calls[method] <= plan.count:
            if plan.retry_safe:
                context.set_trailing_metadata(((RETRY_SAFE_METADATA, "1"),))
            context.abort(plan.code, f"attempt {self.calls[method]} of {method} fails")

    def GetCapabilities(self, request, context):
        self._arrive("GetCapabilities", context)
        self._fail_if_planned("GetCapabilities", context)
        return pb.Capabilities(api_version="curvscope.v1")

    def StatBlob(self, request, context):
        self._arrive("StatBlob", context)
        self._fail_if_planned("StatBlob", context)
        return pb.BlobInfo(sha256=request.sha256, size_bytes=1)

    def DescribeModel(self, request, context):
        self._arrive("DescribeModel", context)
        self._fail_if_planned("DescribeModel", context)
        return pb.ModelDescription(sha256=request.blob.sha256, num_parameters=3)

    def Upload(self, request_iterator, context):
        self._arrive("Upload", context)
        chunks = sum(1 for _ in request_iterator)
        self._fail_if_planned("Upload", context)
        return pb.BlobRef(sha256=f"{chunks:064x}")

    def Analyze(self, request, context):
        self._arrive("Analyze", context)
        yield pb.AnalyzeEvent(progress=pb.Progress(analysis="hessian_eigen", step=1, total=2))
        self._fail_if_planned("Analyze", context)  # after the first event: grpc retries no more
        yield pb.AnalyzeEvent(report=pb.Report(seed=request.options.seed))


@pytest.fixture
def fake():
    servicer = FakeCurvscope()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_CurvscopeServicer_to_server(servicer, server)
    servicer.target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    yield servicer
    server.stop(None)


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def analyze(client: Client, events: list | None = None, **options) -> pb.Report:
    request = pb.AnalyzeRequest(model=pb.ModelRef(blob=pb.BlobRef(sha256=DIGEST)), options=pb.AnalysisOptions(seed=7))
    return client.analyze_request(request, progress=None if events is None else events.append, **options).message


def analyze_error(fake: FakeCurvscope, **options) -> CurvscopeError:
    """The error an Analyze through a new client of ``fake`` ends with."""
    with Client(fake.target) as client, pytest.raises(CurvscopeError) as caught:
        analyze(client, **options)
    return caught.value


# -- grpc's retry policy --------------------------------------------------------------------------
@pytest.mark.parametrize("method, call", [
    ("GetCapabilities", lambda client: client.capabilities()["api_version"] == "curvscope.v1"),
    ("StatBlob", lambda client: client.stat(DIGEST).size_bytes == 1),
    ("DescribeModel", lambda client: client.describe(f"sha256:{DIGEST}")["num_parameters"] == 3),
])
def test_unavailable_is_retried_by_grpc(fake, method, call):
    fake.failures[method] = Failures(MAX_ATTEMPTS - 1, grpc.StatusCode.UNAVAILABLE)
    with Client(fake.target) as client:
        assert call(client)
    assert fake.calls[method] == MAX_ATTEMPTS


def test_retries_end_after_the_policys_attempts_with_the_servers_address(fake):
    fake.failures["GetCapabilities"] = Failures(100, grpc.StatusCode.UNAVAILABLE)
    with Client(fake.target) as client, pytest.raises(CurvscopeError) as caught:
        client.capabilities()
    assert fake.calls["GetCapabilities"] == MAX_ATTEMPTS
    assert caught.value.code == "UNAVAILABLE"
    assert fake.target in caught.value.message and "attempt 5 of GetCapabilities fails" in caught.value.message


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ABORTED,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL])
def test_other_codes_are_not_retried(fake, code):
    fake.failures["GetCapabilities"] = Failures(1, code, retry_safe=True)
    with Client(fake.target) as client, pytest.raises(CurvscopeError) as caught:
        client.capabilities()
    assert caught.value.code == code.name and fake.calls["GetCapabilities"] == 1


def test_upload_is_not_retried(fake, tmp_path):
    """Its chunks are larger than grpc's retry buffer: a retry could not replay them."""
    fake.failures["StatBlob"] = Failures(100, grpc.StatusCode.NOT_FOUND)  # the server lacks the file
    fake.failures["Upload"] = Failures(1, grpc.StatusCode.UNAVAILABLE)
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights")
    with Client(fake.target) as client:
        with pytest.raises(CurvscopeError) as caught:
            client.upload(path)
        assert caught.value.code == "UNAVAILABLE" and fake.calls["Upload"] == 1
        assert client.upload(path) == f"{2:064x}"  # the header and one chunk
    assert fake.calls["Upload"] == 2


def test_analyze_is_not_retried_by_grpc_after_its_first_event(fake):
    fake.failures["Analyze"] = Failures(1, grpc.StatusCode.UNAVAILABLE)
    error = analyze_error(fake)
    assert error.code == "UNAVAILABLE" and fake.calls["Analyze"] == 1


# -- ABORTED, where the server says a retry is safe ---------------------------------------------
def test_an_aborted_analysis_marked_retry_safe_is_sent_again(fake):
    fake.failures["Analyze"] = Failures(1, grpc.StatusCode.ABORTED, retry_safe=True)
    events: list[pb.AnalyzeEvent] = []
    with Client(fake.target) as client:
        assert analyze(client, events).seed == 7
    assert fake.calls["Analyze"] == 2 and len(events) == 2  # each attempt's progress event


def test_aborted_retries_are_bounded(fake):
    fake.failures["Analyze"] = Failures(100, grpc.StatusCode.ABORTED, retry_safe=True)
    with Client(fake.target, aborted_retries=0) as client, pytest.raises(CurvscopeError) as caught:
        analyze(client)
    assert caught.value.code == "ABORTED" and fake.calls["Analyze"] == 1
    with Client(fake.target, aborted_retries=1) as client, pytest.raises(CurvscopeError) as caught:
        analyze(client)
    assert caught.value.code == "ABORTED" and fake.calls["Analyze"] == 3
    assert caught.value.message == "attempt 3 of Analyze fails"


def test_an_aborted_analysis_without_the_mark_is_not_sent_again(fake):
    fake.failures["Analyze"] = Failures(1, grpc.StatusCode.ABORTED)
    error = analyze_error(fake)
    assert error.code == "ABORTED" and fake.calls["Analyze"] == 1


def test_a_retry_never_waits_past_the_deadline(fake):
    """The backoff before the retry (1 s) does not fit in what is left of a 0.5 s deadline."""
    fake.failures["Analyze"] = Failures(1, grpc.StatusCode.ABORTED, retry_safe=True)
    error = analyze_error(fake, timeout=0.5)
    assert error.code == "ABORTED" and fake.calls["Analyze"] == 1


def test_the_server_marks_a_killed_solve_retry_safe_and_nothing_else(tmp_path, monkeypatch):
    from curvscope_service.config import ServerConfig
    from curvscope_service.errors import Aborted, InvalidInput
    from curvscope_service.in_process import InProcessServer
    from curvscope_service.servicer import CurvscopeServicer

    killed = Aborted("the solver process was killed by SIGKILL mid-solve; retry the request")
    outcomes = [killed, None, InvalidInput("not a model"), killed]
    attempts = []

    async def analyze_once(self, request, context):
        attempts.append(request.options.seed)
        yield pb.AnalyzeEvent(progress=pb.Progress(analysis="lipschitz", step=1, total=2))
        error = outcomes[len(attempts) - 1]
        if error is not None:
            raise error
        yield pb.AnalyzeEvent(report=pb.Report(seed=request.options.seed))

    def raw_call(channel: grpc.Channel) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            list(pb_grpc.CurvscopeStub(channel).Analyze(pb.AnalyzeRequest(), metadata=(("x-request-id", "r-1"),),
                                                        timeout=30))
        return caught.value

    monkeypatch.setattr(CurvscopeServicer, "Analyze", analyze_once)
    with InProcessServer(ServerConfig(store=tmp_path / "store")) as server:
        with Client(server.target) as client:
            assert analyze(client).seed == 7  # ABORTED, then sent again
        assert attempts == [7, 7]
        with grpc.insecure_channel(server.target) as channel:
            invalid, aborted = raw_call(channel), raw_call(channel)
    assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(invalid.trailing_metadata()) == {"x-request-id": "r-1"}
    assert aborted.code() == grpc.StatusCode.ABORTED
    assert dict(aborted.trailing_metadata()) == {RETRY_SAFE_METADATA: "1", "x-request-id": "r-1"}


# -- deadlines ------------------------------------------------------------------------------------
def unbounded(remaining: float | None) -> bool:
    """A call without a deadline: grpc's servers say so with None or the largest time there is."""
    return remaining is None or remaining > 1e9


def test_unary_calls_have_a_default_deadline_and_streams_none(fake):
    with Client(fake.target) as client:
        client.capabilities()
        client.stat(DIGEST)
        analyze(client)
    # grpc sends a deadline as a timeout rounded up: a little over the seconds set.
    assert 0 < fake.deadlines["GetCapabilities"] <= UNARY_TIMEOUT_SECONDS + 1
    assert 0 < fake.deadlines["StatBlob"] <= UNARY_TIMEOUT_SECONDS + 1
    assert unbounded(fake.deadlines["Analyze"])
    with Client(fake.target, unary_timeout=None) as client:
        client.capabilities()
        analyze(client, timeout=30)
    assert unbounded(fake.deadlines["GetCapabilities"]) and 0 < fake.deadlines["Analyze"] <= 31


# -- the connection: waiting for one, and the message when there is none -------------------------
def test_a_call_waits_for_a_server_that_starts_later():
    port = closed_port()
    servicer = FakeCurvscope()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CurvscopeServicer_to_server(servicer, server)
    started = threading.Event()
    with Client(f"127.0.0.1:{port}", connect_timeout=120) as client, futures.ThreadPoolExecutor(1) as pool:
        def call() -> dict:
            started.set()
            return client.capabilities()
        answer = pool.submit(call)
        assert started.wait(60)
        assert server.add_insecure_port(f"127.0.0.1:{port}") == port
        server.start()
        try:
            assert answer.result(timeout=120)["api_version"] == "curvscope.v1"
        finally:
            server.stop(None)
    assert servicer.calls["GetCapabilities"] == 1


def test_an_unreachable_server_names_its_address_and_how_to_set_it(monkeypatch):
    address = f"127.0.0.1:{closed_port()}"
    monkeypatch.delenv("CURVSCOPE_SERVER", raising=False)
    with Client(address, connect_timeout=0.5) as client, pytest.raises(CurvscopeError) as caught:
        client.capabilities()
    message = caught.value.message
    assert caught.value.code == "UNAVAILABLE"
    assert f"could not reach the server at {address} (from the target argument)" in message
    for hint in ("`curvscope serve`", "--server", "CURVSCOPE_SERVER", "--local"):
        assert hint in message
    monkeypatch.setenv("CURVSCOPE_SERVER", address)
    with Client(connect_timeout=0.5) as client, pytest.raises(CurvscopeError) as caught:
        client.stat(DIGEST)
    assert f"at {address} (from CURVSCOPE_SERVER)" in caught.value.message
    monkeypatch.delenv("CURVSCOPE_SERVER")
    assert Client().target_origin == "the default"


def test_the_cli_says_which_flag_named_the_unreachable_server(tmp_path, monkeypatch, capsys):
    address = f"127.0.0.1:{closed_port()}"
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    monkeypatch.delenv("CURVSCOPE_SERVER", raising=False)
    assert main(["analyze", str(model), "--server", address, "--connect-timeout", "0.5"]) == 3
    err = capsys.readouterr().err
    assert f"UNAVAILABLE: could not reach the server at {address} (from --server)" in err
    assert len(err.strip().splitlines()) == 1
    monkeypatch.setenv("CURVSCOPE_SERVER", address)
    assert main(["analyze", str(model), "--connect-timeout", "0.5"]) == 3
    assert f"at {address} (from CURVSCOPE_SERVER)" in capsys.readouterr().err


# -- keepalive --------------------------------------------------------------------------------------
def test_the_server_accepts_the_clients_keepalive_pings():
    """A server answers pings closer than its minimum interval with GOAWAY too_many_pings, which
    would end a long, quiet Analyze stream."""
    from curvscope_service.server import KEEPALIVE_OPTIONS as SERVER_KEEPALIVE

    server = dict(SERVER_KEEPALIVE)
    assert KEEPALIVE_OPTIONS["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]
    # Pings continue however long the stream stays quiet, on both sides.
    assert KEEPALIVE_OPTIONS["grpc.http2.max_pings_without_data"] == server["grpc.http2.max_pings_without_data"] == 0
    # Other clients may ping between calls too.
    assert server["grpc.keepalive_permit_without_calls"] == 1
