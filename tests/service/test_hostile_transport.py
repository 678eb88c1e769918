"""Hostile input at the transport, over gRPC on a loopback port: links and FIFOs planted in the
store, digests with a trailing newline, malformed file:// URIs, deep or mistyped
architecture_config_json, stalled uploads, where /metrics listens, and internal errors that
must never carry a traceback to the client."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest

from curvscope import Client, CurvscopeError
from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb
from curvscope._proto.curvscope.v1 import curvscope_pb2_grpc as pb_grpc
from curvscope_service import engine
from curvscope_service.config import ServerConfig, config_from_args
from curvscope_service.in_process import InProcessServer
from curvscope_service.server import start_metrics
from curvscope_service.store import BlobStore
from server_process import ServerProcess

SECRET = b"SECRET-BYTES-OF-A-FILE-OUTSIDE-THE-STORE " * 4


def _stub(target: str) -> pb_grpc.CurvscopeStub:
    return pb_grpc.CurvscopeStub(grpc.insecure_channel(target))


def _refused(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call(*args, timeout=30, **kwargs)
        if isinstance(result, grpc.Call):  # a stream: read it to its status
            list(result)
    return caught.value


def _blob_path(server: InProcessServer, digest: str) -> Path:
    return server.config.store / "blobs" / "sha256" / digest[:2] / digest


def _unused_shard(server: InProcessServer) -> str:
    """Two hex digits that no blob in the store starts with."""
    blobs = server.config.store / "blobs" / "sha256"
    return next(f"{n:02x}" for n in range(256) if not os.path.lexists(blobs / f"{n:02x}"))


def _plant(path: Path, make) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    make(path)


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "outside" / "secret.safetensors"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


# -- links and other non-files in the store ----------------------------------------------------
def test_a_link_planted_as_a_blob_is_absent_and_an_upload_replaces_it(server, client, secret, tmp_path):
    payload = os.urandom(3000)
    digest = hashlib.sha256(payload).hexdigest()
    _plant(_blob_path(server, digest), lambda path: path.symlink_to(secret))
    stub = _stub(server.target)
    stat = _refused(stub.StatBlob, pb.BlobRef(sha256=digest))
    assert stat.code() == grpc.StatusCode.NOT_FOUND and "upload it first" in stat.details()
    for call, request in [
        (stub.DescribeModel, pb.ModelRef(blob=pb.BlobRef(sha256=digest))),
        (stub.Analyze, pb.AnalyzeRequest(model=pb.ModelRef(blob=pb.BlobRef(sha256=digest)),
                                         analyses=[pb.AnalysisSpec(weight_spectra=pb.WeightSpectraSpec())])),
    ]:
        error = _refused(call, request)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert b"SECRET" not in error.details().encode()
    # The client sees NOT_FOUND, so it uploads; the verified file takes the link's place.
    local = tmp_path / "payload.bin"
    local.write_bytes(payload)
    assert client.upload(local) == digest
    assert not _blob_path(server, digest).is_symlink()
    assert client.stat(digest).size_bytes == len(payload)
    assert secret.read_bytes() == SECRET


def test_a_linked_shard_folder_and_a_fifo_are_absent(server, secret):
    stub = _stub(server.target)
    linked = _unused_shard(server) + "0" * 62
    outside = secret.parent / "shard"
    outside.mkdir()
    (outside / linked).write_bytes(SECRET)
    shard = _blob_path(server, linked).parent
    shard.parent.mkdir(parents=True, exist_ok=True)
    shard.symlink_to(outside, target_is_directory=True)
    fifo = "f1" + "0" * 62
    _plant(_blob_path(server, fifo), os.mkfifo)  # opened blocking, it would hang the server
    for digest in (linked, fifo):
        error = _refused(stub.StatBlob, pb.BlobRef(sha256=digest))
        assert error.code() == grpc.StatusCode.NOT_FOUND, digest
        error = _refused(stub.DescribeModel, pb.ModelRef(blob=pb.BlobRef(sha256=digest)))
        assert error.code() == grpc.StatusCode.NOT_FOUND and b"SECRET" not in error.details().encode()


def test_a_link_planted_as_a_cached_report_is_dropped_not_followed(server, client, digits_files, tmp_path):
    request = pb.AnalyzeRequest(model=client.model_ref(digits_files[0]),
                                analyses=[pb.AnalysisSpec(weight_spectra=pb.WeightSpectraSpec())])
    results = server.config.store / "results"
    before = set(results.rglob("*.json"))
    first = client.analyze_request(request).to_dict()
    (cached,) = set(results.rglob("*.json")) - before
    planted = tmp_path / "planted.json"
    planted.write_text(json.dumps({**json.loads(cached.read_text()), "device": "planted"}))
    cached.unlink()
    cached.symlink_to(planted)
    again = client.analyze_request(request).to_dict()
    assert again["device"] == first["device"] != "planted"  # recomputed, not read through the link
    assert not cached.is_symlink() and json.loads(planted.read_text())["device"] == "planted"


def test_gc_never_descends_into_a_linked_shard_folder(tmp_path):
    store = BlobStore(tmp_path / "store", max_age_seconds=1.0)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / ("ab" + "1" * 62)
    victim.write_bytes(b"not the store's")
    (store.blobs_dir / "ab").symlink_to(outside, target_is_directory=True)
    store.gc(now=victim.stat().st_mtime + 3600)
    assert victim.read_bytes() == b"not the store's"


# -- digests -----------------------------------------------------------------------------------
def test_a_digest_with_a_trailing_newline_is_not_a_digest(server):
    stub = _stub(server.target)
    digest = "a" * 64 + "\n"
    for call, request in [
        (stub.StatBlob, pb.BlobRef(sha256=digest)),
        (stub.DescribeModel, pb.ModelRef(blob=pb.BlobRef(sha256=digest))),
        (stub.Upload, iter([pb.UploadChunk(header=pb.UploadHeader(sha256=digest, size_bytes=3)),
                            pb.UploadChunk(data=b"abc")])),
    ]:
        error = _refused(call, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, call
        assert "not a sha256 digest" in error.details() and "\n" not in error.details()
    assert list((server.config.store / "tmp").iterdir()) == []


# -- file:// URIs ------------------------------------------------------------------------------
def _uri_cases(models: Path) -> list[tuple[str, grpc.StatusCode, str]]:
    root = f"file://{models}"
    return [
        (f"{root}/model.safetensors%00.txt", grpc.StatusCode.INVALID_ARGUMENT, "control character"),
        (f"{root}/%ff%fe.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "not UTF-8"),
        (f"{root}/{'a' * 5000}", grpc.StatusCode.INVALID_ARGUMENT, "limit is 4096"),
        (f"{root}/{'a' * 300}", grpc.StatusCode.INVALID_ARGUMENT, "too long"),
        (f"{root}/model\n.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "control character"),
        ("file://[::1/model.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "not a valid URI"),
        (f"file://elsewhere.example{models}/m.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "host"),
        (f"{root}/m.safetensors?version=2", grpc.StatusCode.INVALID_ARGUMENT, "no query"),
        ("file:relative/m.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "ABSOLUTE"),
        ("https://example.com/m.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "unsupported URI"),
        ("file:///etc/passwd", grpc.StatusCode.PERMISSION_DENIED, "outside"),
        (f"{root}/%2e%2e/%2e%2e/etc/passwd", grpc.StatusCode.PERMISSION_DENIED, "outside"),
        (f"{root}/missing.safetensors", grpc.StatusCode.NOT_FOUND, "does not exist"),
        (root, grpc.StatusCode.INVALID_ARGUMENT, "has no config.json"),  # a folder: read as a checkpoint folder
    ]


def test_bad_uris_are_refused_with_a_short_message(server, client):
    stub = _stub(server.target)
    for uri, code, words in _uri_cases(server.config.model_roots[0]):
        for call, request in [(stub.DescribeModel, pb.ModelRef(uri=uri)),
                              (stub.Analyze, pb.AnalyzeRequest(model=pb.ModelRef(uri=uri), analyses=[
                                  pb.AnalysisSpec(weight_spectra=pb.WeightSpectraSpec())]))]:
            error = _refused(call, request)
            assert error.code() == code, (uri[:80], error.details())
            assert words in error.details(), (uri[:80], error.details())
            assert "\n" not in error.details() and len(error.details()) < 400, uri[:80]
    assert client.capabilities()["api_version"] == "curvscope.v1"  # still serving


# -- architecture_config_json ------------------------------------------------------------------
CONFIG_CASES = {
    "deep array": ("[" * 200_000 + "]" * 200_000, "deeper than"),
    "deep object": ('{"a":' * 100_000 + "1" + "}" * 100_000, "deeper than"),
    "over 1 MiB": ('{"layers": []}' + " " * (1 << 20), "limit"),
    "not JSON": ("{'layers': 1}", "not valid JSON"),
    "an array": ('["layers"]', "JSON object"),
    "a string": ('"sequential"', "JSON object"),
    "layers a number": ('{"layers": 5}', "layers"),
    "type a list": ('{"layers": [{"type": ["linear"]}]}', "string 'type'"),
    "size an object": ('{"layers": [{"type": "linear", "in_features": {"n": 64}, "out_features": 32}]}',
                       "in_features"),
    "size a string": ('{"layers": [{"type": "linear", "in_features": "64", "out_features": 32}]}', "linear"),
    "dtype a list": ('{"layers": [{"type": "linear", "in_features": 64, "out_features": 32, "dtype": [1]}]}',
                     "dtype"),
    "input_shape a string": (
        '{"input_shape": "64", "layers": [{"type": "linear", "in_features": 64, "out_features": 32}]}',
        "input_shape"),
}


@pytest.mark.parametrize("text, words", CONFIG_CASES.values(), ids=CONFIG_CASES)
def test_bad_architecture_config_json_is_invalid_argument(server, client, digits_files, text, words):
    model = client.model_ref(digits_files[0], architecture="sequential", architecture_config_json=text)
    stub = _stub(server.target)
    for call, request in [(stub.DescribeModel, model),
                          (stub.Analyze, pb.AnalyzeRequest(model=model, analyses=[
                              pb.AnalysisSpec(weight_spectra=pb.WeightSpectraSpec())]))]:
        error = _refused(call, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert words in error.details() and "\n" not in error.details()


@pytest.mark.parametrize("entry", [
    {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},
    {"dtype": {"name": "F32"}, "shape": [1], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [1], "data_offsets": {"begin": 0}},
], ids=["dtype a list", "dtype an object", "shape a string", "offsets an object"])
def test_a_header_value_of_the_wrong_json_type_is_invalid_argument(client, tmp_path, entry):
    header = json.dumps({"__metadata__": {"architecture": "sequential"}, "w": entry}).encode()
    model = tmp_path / "typed.safetensors"
    model.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    with pytest.raises(CurvscopeError) as caught:
        client.describe(model)
    assert caught.value.code == "INVALID_ARGUMENT" and "\n" not in caught.value.message


# -- stalled uploads ---------------------------------------------------------------------------
def test_a_stalled_upload_is_dropped_and_the_server_goes_on(tmp_path):
    payload = os.urandom(5000)
    digest = hashlib.sha256(payload).hexdigest()
    config = ServerConfig(store=tmp_path / "store", upload_idle_timeout_seconds=0.5)
    release = threading.Event()

    def stalled():
        yield pb.UploadChunk(header=pb.UploadHeader(sha256=digest, size_bytes=len(payload)))
        yield pb.UploadChunk(data=payload[:1000])
        release.wait(120)  # a client that sends its header and a little, then nothing

    with InProcessServer(config) as server, Client(server.target) as client:
        try:
            # The call's own deadline is far off: what ends it is the server's idle timeout.
            error = _refused(_stub(server.target).Upload, stalled())
        finally:
            release.set()
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "--upload-idle-timeout" in error.details() and "0.5 s" in error.details()
        assert list(server.running.store.tmp_dir.iterdir()) == []
        assert client.stat(digest) is None
        config.upload_idle_timeout_seconds = 60.0  # the next upload cannot race the tiny timeout
        local = tmp_path / "payload.bin"
        local.write_bytes(payload)
        assert client.upload(local) == digest and client.stat(digest).size_bytes == len(payload)


def test_upload_idle_timeout_flag_and_environment(monkeypatch):
    monkeypatch.delenv("CURVSCOPE_UPLOAD_IDLE_TIMEOUT", raising=False)
    assert config_from_args([]).upload_idle_timeout_seconds == 60.0
    assert config_from_args(["--upload-idle-timeout", "0"]).upload_idle_timeout_seconds == 0.0
    monkeypatch.setenv("CURVSCOPE_UPLOAD_IDLE_TIMEOUT", "7.5")
    assert config_from_args([]).upload_idle_timeout_seconds == 7.5
    for bad in ("-1", "nan"):
        with pytest.raises(SystemExit):
            config_from_args(["--upload-idle-timeout", bad])


# -- where /metrics listens --------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on ``port`` (from /proc/net/tcp{,6})."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        lines = Path(table).read_text().splitlines()[1:] if Path(table).exists() else []
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                found.add(address)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's socket table")
def test_metrics_listen_on_the_server_host_by_default(tmp_path):
    port = _free_port()
    flags = ["--store", str(tmp_path / "store"), "--device", "cpu", "--metrics-port", str(port)]
    with ServerProcess(flags, env={"CURVSCOPE_METRICS_HOST": ""}):  # --host 127.0.0.1
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            assert response.status == 200
        assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1 alone, not 0.0.0.0


def test_metrics_host_overrides_the_server_host(monkeypatch):
    monkeypatch.delenv("CURVSCOPE_METRICS_HOST", raising=False)
    assert config_from_args([]).metrics_host == ""
    assert config_from_args(["--metrics-host", "127.0.0.1"]).metrics_host == "127.0.0.1"
    monkeypatch.setenv("CURVSCOPE_METRICS_HOST", "::1")
    assert config_from_args([]).metrics_host == "::1"
    config = ServerConfig(host="[::]", metrics_host="127.0.0.1", metrics_port=_free_port())
    httpd, _thread = start_metrics(config)
    try:
        assert httpd.server_address[0] == "127.0.0.1"
    finally:
        httpd.shutdown()
        httpd.server_close()


# -- internal errors ---------------------------------------------------------------------------
def test_an_internal_error_reaches_the_client_as_an_incident_id_only(server, client, digits_files, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internals\nTraceback (most recent call last): more secrets")

    monkeypatch.setattr(engine, "describe", broken)
    monkeypatch.setattr(engine, "run_analysis", broken)
    stub = _stub(server.target)
    model = client.model_ref(digits_files[0])
    request = pb.AnalyzeRequest(model=model, options=pb.AnalysisOptions(seed=987654),
                                analyses=[pb.AnalysisSpec(weight_spectra=pb.WeightSpectraSpec())])
    for call, message in [(stub.DescribeModel, model), (stub.Analyze, request)]:
        error = _refused(call, message)
        assert error.code() == grpc.StatusCode.INTERNAL
        assert error.details().startswith("internal error ") and "server's log" in error.details()
        assert "secret" not in error.details() and "Traceback" not in error.details()
    assert client.capabilities()["api_version"] == "curvscope.v1"
