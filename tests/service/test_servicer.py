"""End to end over gRPC on a loopback port: uploads, analyses, bad input, health, cancellation."""

from __future__ import annotations

import hashlib
import threading

import grpc
import jsonschema
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client import REGISTRY
from safetensors.torch import load_file, save_file

from curvscope import Client, CurvscopeError, json_schema
from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb
from curvscope._proto.curvscope.v1 import curvscope_pb2_grpc as pb_grpc
from curvscope_service.analyses import ANALYSES
from curvscope_service.loading import load_data, load_model
from curvscope_service.losses import get_loss
from dense_reference import dense_hessian


def _health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _assert_alive(client: Client, *digests: str) -> None:
    """The server still answers and the blobs it held are intact."""
    assert _health(client.target) == health_pb2.HealthCheckResponse.SERVING
    assert _health(client.target, "curvscope.v1.Curvscope") == health_pb2.HealthCheckResponse.SERVING
    for digest in digests:
        assert client.stat(digest).size_bytes > 0


def _dense_eigenvalues(model_path, data_path, loss="cross_entropy") -> torch.Tensor:
    model = load_model(model_path, dtype=torch.float64)
    data = load_data(data_path, dtype=torch.float64)
    return torch.linalg.eigvalsh(dense_hessian(model.module, data.inputs, data.targets, get_loss(loss)))


def test_health_reflection_and_capabilities(server, client):
    _assert_alive(client)
    with grpc.insecure_channel(server.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"curvscope.v1.Curvscope", "grpc.health.v1.Health"} <= services
    capabilities = client.capabilities()
    assert capabilities["analyses"] == list(ANALYSES)  # exactly the registry: nothing unbuilt is advertised
    assert "cross_entropy" in capabilities["losses"] and "sequential" in capabilities["architectures"]
    assert capabilities["devices"][0]["name"] == "cpu"
    assert capabilities["limits"]["max_upload_bytes"] == 8 << 20


def test_upload_stat_and_dedup(client, digits_files, tmp_path):
    model_path, _ = digits_files
    digest = client.upload(model_path)
    assert digest == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert client.stat(digest).size_bytes == model_path.stat().st_size
    assert client.upload(model_path) == digest  # skipped: the server has it
    assert client.stat("0" * 64) is None


def _raw_upload(server, chunks):
    with grpc.insecure_channel(server.target) as channel:
        return pb_grpc.CurvscopeStub(channel).Upload(iter(chunks), timeout=10)


def test_bad_uploads_leave_nothing_and_the_server_up(server, client, digits_files):
    kept = client.upload(digits_files[0])
    payload = b"some model bytes"
    cases = {
        "digest": ([pb.UploadChunk(header=pb.UploadHeader(sha256="a" * 64, size_bytes=len(payload))),
                    pb.UploadChunk(data=payload)], grpc.StatusCode.INVALID_ARGUMENT, "sha256"),
        "no header": ([pb.UploadChunk(data=payload)], grpc.StatusCode.INVALID_ARGUMENT, "header"),
        "oversize": ([pb.UploadChunk(header=pb.UploadHeader(sha256="b" * 64, size_bytes=1 << 30))],
                     grpc.StatusCode.RESOURCE_EXHAUSTED, "limit"),
        "truncated": ([pb.UploadChunk(header=pb.UploadHeader(
            sha256=hashlib.sha256(payload).hexdigest(), size_bytes=len(payload))),
            pb.UploadChunk(data=payload[:5])], grpc.StatusCode.INVALID_ARGUMENT, "bytes declared"),
        "not a digest": ([pb.UploadChunk(header=pb.UploadHeader(sha256="xyz", size_bytes=3))],
                         grpc.StatusCode.INVALID_ARGUMENT, "sha256"),
    }
    for name, (chunks, code, words) in cases.items():
        with pytest.raises(grpc.RpcError) as caught:
            _raw_upload(server, chunks)
        assert caught.value.code() == code, name
        assert words in caught.value.details() and "\n" not in caught.value.details(), name
    assert list(server.config.store.joinpath("tmp").iterdir()) == []
    assert client.stat(hashlib.sha256(payload).hexdigest()) is None
    _assert_alive(client, kept)


def test_describe_model(client, digits_files):
    description = client.describe(digits_files[0])
    assert description["num_parameters"] == 64 * 32 + 32 + 32 * 10 + 10
    assert [block["name"] for block in description["blocks"]] == ["0", "2"]
    assert description["input_shape"] == [64]
    assert description["lipschitz_chain"]["found"] is True


def test_analyze_matches_the_dense_hessian(client, digits_files):
    model_path, data_path = digits_files
    events = []
    report = client.analyze(model_path, data_path, eigen=3, smallest=2, per_layer=True, progress=events.append)
    as_dict = report.to_dict()
    jsonschema.validate(as_dict, json_schema())
    eigen = as_dict["results"]["hessian_eigen"]
    truth = _dense_eigenvalues(model_path, data_path)
    assert eigen["converged"] is True
    torch.testing.assert_close(torch.tensor(eigen["largest"], dtype=torch.float64), truth.flip(0)[:3], rtol=1e-3, atol=0)
    assert len(eigen["smallest"]) == 2 and eigen["smallest"][0] <= eigen["smallest"][1]
    assert set(as_dict["per_layer"]) == {"0", "2"}
    assert as_dict["model"]["num_parameters"] == 2410 and as_dict["data"]["num_samples"] == 512
    assert any(e.HasField("queued") for e in events) and any(e.HasField("progress") for e in events)


def test_analyze_from_a_model_root_uri(server, client, digits_files):
    model_path, data_path = digits_files
    inside = server.config.model_roots[0] / "model.safetensors"
    inside.write_bytes(model_path.read_bytes())
    report = client.analyze(inside.as_uri(), data_path)
    assert report.results.hessian_eigen.largest
    with pytest.raises(CurvscopeError) as caught:
        client.analyze(model_path.resolve().as_uri(), data_path)
    assert caught.value.code == "PERMISSION_DENIED"


def _write_variant(tmp_path, source, name, edit):
    tensors = load_file(str(source))
    edit(tensors)
    path = tmp_path / name
    save_file(tensors, str(path), metadata=_metadata(source))
    return path


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def test_bad_input_gets_invalid_argument_and_the_server_stays_up(client, digits_files, tmp_path):
    model_path, data_path = digits_files
    kept = [client.upload(model_path), client.upload(data_path)]
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(model_path.read_bytes()[:-100])
    pickled = tmp_path / "model.pkl"
    pickled.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    nan_model = _write_variant(tmp_path, model_path, "nan.safetensors",
                               lambda t: t["0.weight"].__setitem__((0, 0), float("nan")))
    narrow_data = tmp_path / "narrow.safetensors"
    save_file({"inputs": torch.zeros(8, 10), "targets": torch.zeros(8, dtype=torch.int64)}, str(narrow_data))
    bad_targets = tmp_path / "bad-targets.safetensors"
    save_file({"inputs": torch.zeros(8, 64), "targets": torch.full((8,), 17, dtype=torch.int64)}, str(bad_targets))
    cases = [
        (truncated, data_path, {}, "truncated"),
        (pickled, data_path, {}, "pickle"),
        (nan_model, data_path, {}, "0.weight"),
        (model_path, narrow_data, {}, "shape"),
        (model_path, bad_targets, {}, "class"),
        (model_path, data_path, {"loss": "hinge"}, "hinge"),
    ]
    for model, data, options, words in cases:
        with pytest.raises(CurvscopeError) as caught:
            client.analyze(model, data, **options)
        assert caught.value.code == "INVALID_ARGUMENT", (model.name, caught.value)
        assert words in caught.value.message.lower() and "\n" not in caught.value.message, caught.value.message
        assert "Traceback" not in caught.value.message
    _assert_alive(client, *kept)


def test_unbuilt_analyses_and_missing_blobs(client, digits_files):
    model_path, data_path = digits_files
    request = pb.AnalyzeRequest(model=pb.ModelRef(blob=pb.BlobRef(sha256="e" * 64)),
                                analyses=[pb.AnalysisSpec(hessian_eigen=pb.HessianEigenSpec())])
    with pytest.raises(CurvscopeError) as caught:
        client.analyze_request(request)
    assert caught.value.code == "NOT_FOUND"
    request = pb.AnalyzeRequest(model=client.model_ref(model_path), data=client.data_ref(data_path),
                                options=pb.AnalysisOptions(curvature=pb.CURVATURE_GGN),
                                analyses=[pb.AnalysisSpec(non_uniformity=pb.NonUniformitySpec())])
    with pytest.raises(CurvscopeError) as caught:
        client.analyze_request(request)
    assert caught.value.code == "UNIMPLEMENTED" and "ggn" in caught.value.message
    with pytest.raises(CurvscopeError) as caught:
        client.analyze(model_path, data_path, eigen=1, max_hvps=10**6)
    assert caught.value.code == "INVALID_ARGUMENT"


@pytest.fixture(scope="module")
def big_data(digits_files, tmp_path_factory):
    """The digits batch repeated to 8192 samples: about 0.3 s per product in micro-batches of 64."""
    data = load_file(str(digits_files[1]))
    path = tmp_path_factory.mktemp("big") / "big.safetensors"
    save_file({"inputs": data["inputs"].repeat(16, 1), "targets": data["targets"].repeat(16)}, str(path))
    return path


def _slow_request(client, model_path, data_path, top_k=40, max_hvps=2000) -> pb.AnalyzeRequest:
    """Minutes of products unless stopped (a tolerance float32 products never reach)."""
    return pb.AnalyzeRequest(
        model=client.model_ref(model_path), data=client.data_ref(data_path), loss="cross_entropy",
        options=pb.AnalysisOptions(micro_batch_size=64),
        analyses=[pb.AnalysisSpec(hessian_eigen=pb.HessianEigenSpec(top_k=top_k, tolerance=1e-9, max_hvps=max_hvps))])


def _hvps() -> float:
    return REGISTRY.get_sample_value("curvscope_hvps_total", {"device": "cpu", "curvature": "hessian"}) or 0.0


def test_cancel_and_deadline_stop_the_device_work(client, digits_files, big_data):
    request = _slow_request(client, digits_files[0], big_data)
    hvps = _hvps()
    with pytest.raises(CurvscopeError) as caught:
        client.analyze_request(request, timeout=1.0)
    assert caught.value.code == "DEADLINE_EXCEEDED"

    with grpc.insecure_channel(client.target) as channel:
        call = pb_grpc.CurvscopeStub(channel).Analyze(request)
        for event in call:
            if event.HasField("progress"):
                break
        call.cancel()
    # The worker is free again: a quick analysis runs after the two stopped ones, which between
    # them computed far fewer products than one of their budgets of 2,000 (minutes of work). The
    # counter takes a job's products when the job ends, so it holds both by now.
    model_path, data_path = digits_files
    positions = []
    # A seed no other test uses: computed, not answered from the cache.
    report = client.analyze(model_path, data_path, seed=11, progress=lambda e: positions.append(e.queued.position)
                            if e.HasField("queued") else None)
    assert report.results.hessian_eigen.converged
    assert positions[-1] == 0, positions
    assert 0 < _hvps() - hvps - report.results.hessian_eigen.hvps < 2000


def test_token_auth(tmp_path, digits_files):
    from curvscope_service.config import ServerConfig
    from curvscope_service.in_process import InProcessServer

    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\nother\n")
    with InProcessServer(ServerConfig(store=tmp_path / "store", token_file=tokens)) as running:
        assert _health(running.target) == health_pb2.HealthCheckResponse.SERVING  # probes need no token
        for token, code in [(None, "UNAUTHENTICATED"), ("wrong", "PERMISSION_DENIED")]:
            with Client(running.target, token=token or "") as client:
                with pytest.raises(CurvscopeError) as caught:
                    client.capabilities()
                assert caught.value.code == code
        with Client(running.target, token="other") as client:
            assert client.capabilities()["auth_required"] is True
            assert client.upload(digits_files[0])


def test_graceful_shutdown_lets_running_work_finish(tmp_path, digits_files, big_data):
    from curvscope_service.config import ServerConfig
    from curvscope_service.in_process import InProcessServer

    running = InProcessServer(ServerConfig(store=tmp_path / "store")).__enter__()
    started, outcome = threading.Event(), {}

    def analyze():
        with Client(running.target) as client:
            request = _slow_request(client, digits_files[0], big_data, top_k=2, max_hvps=8)
            outcome["report"] = client.analyze_request(
                request, progress=lambda event: started.set() if event.HasField("progress") else None)

    worker = threading.Thread(target=analyze)
    worker.start()
    assert started.wait(60)
    running.stop(grace=60)  # returns once the running call has finished
    worker.join(60)
    eigen = outcome["report"].results.hessian_eigen
    assert eigen.hvps == 8 and not eigen.converged  # the budget ran out: reported, never called converged
