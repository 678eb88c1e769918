"""Property-based fuzzing of the wire: random upload streams, random request messages and raw
bytes that are not messages at all. The server answers each with a status a client can act on
(never INTERNAL or UNKNOWN), keeps no partial blob, and stays up."""

from __future__ import annotations

import hashlib

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curvscope import Client
from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb
from curvscope_service.config import ServerConfig
from curvscope_service.in_process import InProcessServer

NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, digits_files):
    root = tmp_path_factory.mktemp("fuzz")
    config = ServerConfig(store=root / "store", max_upload_bytes=1 << 18, max_queue_depth=2)
    with InProcessServer(config) as server, Client(server.target) as client:
        digests = (client.upload(digits_files[0]), client.upload(digits_files[1]))
        channel = grpc.insecure_channel(server.target)
        yield server, channel, digests
        channel.close()


def _code(call) -> grpc.StatusCode:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        assert "Traceback" not in (error.details() or "")
        return error.code()


def _alive(server, channel, digests) -> None:
    stat = channel.unary_unary("/curvscope.v1.Curvscope/StatBlob", request_serializer=pb.BlobRef.SerializeToString,
                               response_deserializer=pb.BlobInfo.FromString)
    for digest in digests:
        assert stat(pb.BlobRef(sha256=digest), timeout=10).size_bytes > 0
    assert list((server.config.store / "tmp").iterdir()) == []


headers = st.builds(
    pb.UploadHeader,
    sha256=st.one_of(st.text(max_size=70), st.text("0123456789abcdef", min_size=64, max_size=64)),
    size_bytes=st.one_of(st.integers(0, 1 << 19), st.integers(0, 2**64 - 1)),
    filename=st.text(max_size=20))
chunks = st.one_of(st.builds(pb.UploadChunk, header=headers), st.builds(pb.UploadChunk, data=st.binary(max_size=4096)))


@FUZZ
@given(stream=st.lists(chunks, max_size=6), honest=st.booleans())
def test_upload_streams(fuzz_server, stream, honest):
    server, channel, digests = fuzz_server
    if honest and stream:
        # Half the time, a header that matches the data that follows (the happy path, fuzzed).
        body = b"".join(c.data for c in stream if c.WhichOneof("payload") == "data")
        stream = [pb.UploadChunk(header=pb.UploadHeader(sha256=hashlib.sha256(body).hexdigest(), size_bytes=len(body)))] + [
            c for c in stream if c.WhichOneof("payload") == "data"]
    upload = channel.stream_unary("/curvscope.v1.Curvscope/Upload", request_serializer=pb.UploadChunk.SerializeToString,
                                  response_deserializer=pb.BlobRef.FromString)
    code = _code(lambda: upload(iter(stream), timeout=10))
    assert code not in NEVER
    _alive(server, channel, digests)


@st.composite
def requests(draw, digests):
    model_digest, data_digest = digests
    blob = st.one_of(st.sampled_from([model_digest, data_digest]), st.text(max_size=66))
    model = pb.ModelRef(format=draw(st.integers(0, 6)), architecture=draw(st.text(max_size=8)),
                        architecture_config_json=draw(st.sampled_from(["", "{}", "[1]", "{bad", '{"layers": 3}'])))
    if draw(st.booleans()):
        model.blob.sha256 = draw(blob)
    else:
        model.uri = draw(st.sampled_from(["", "file:///etc/passwd", "http://x/m.pt2", "file://%00"]))
    request = pb.AnalyzeRequest(model=model, loss=draw(st.sampled_from(["", "cross_entropy", "mse", "hinge", "\x00"])))
    if draw(st.booleans()):
        request.data.blob.sha256 = draw(blob)
    small = st.integers(0, 12)
    request.options.CopyFrom(pb.AnalysisOptions(
        curvature=draw(st.integers(0, 6)), precision=draw(st.integers(0, 4)), seed=draw(st.integers(0, 2**64 - 1)),
        micro_batch_size=draw(st.integers(0, 1 << 20)), max_samples=draw(st.integers(0, 600)),
        per_layer=draw(st.booleans())))
    # Cheap analyses only, with fuzzed options: the point is the checks, not minutes of products.
    for _ in range(draw(st.integers(0, 3))):
        which = draw(st.sampled_from(["hessian_eigen", "hessian_trace", "hessian_density", "sharpness", "empty"]))
        if which == "hessian_eigen":
            spec = pb.AnalysisSpec(hessian_eigen=pb.HessianEigenSpec(
                top_k=draw(small), bottom_k=draw(small), max_hvps=draw(st.integers(0, 40)),
                tolerance=draw(st.floats(allow_nan=True, allow_infinity=True))))
        elif which == "hessian_trace":
            spec = pb.AnalysisSpec(hessian_trace=pb.HessianTraceSpec(max_hvps=draw(st.integers(0, 40))))
        elif which == "hessian_density":
            spec = pb.AnalysisSpec(hessian_density=pb.HessianDensitySpec(
                num_probes=draw(st.integers(0, 3)), lanczos_steps=draw(st.integers(0, 12))))
        elif which == "sharpness":
            spec = pb.AnalysisSpec(sharpness=pb.SharpnessSpec(learning_rate=draw(st.floats())))
        else:
            spec = pb.AnalysisSpec()
        request.analyses.append(spec)
    return request


@pytest.fixture(scope="module")
def request_strategy(fuzz_server):
    return requests(fuzz_server[2])


@FUZZ
@given(data=st.data())
def test_analyze_requests(fuzz_server, request_strategy, data):
    server, channel, digests = fuzz_server
    request = data.draw(request_strategy)
    analyze = channel.unary_stream("/curvscope.v1.Curvscope/Analyze", request_serializer=pb.AnalyzeRequest.SerializeToString,
                                   response_deserializer=pb.AnalyzeEvent.FromString)
    code = _code(lambda: list(analyze(request, timeout=20)))
    assert code not in NEVER, request
    _alive(server, channel, digests)


@FUZZ
@given(payload=st.binary(max_size=512), method=st.sampled_from(["Analyze", "StatBlob", "DescribeModel", "GetCapabilities"]))
def test_raw_bytes(fuzz_server, payload, method):
    """Bytes that may not parse as the method's message at all."""
    server, channel, digests = fuzz_server
    path = f"/curvscope.v1.Curvscope/{method}"
    if method == "Analyze":
        code = _code(lambda: list(channel.unary_stream(path)(payload, timeout=20)))
    else:
        code = _code(lambda: channel.unary_unary(path)(payload, timeout=20))
    assert code not in NEVER
    _alive(server, channel, digests)
