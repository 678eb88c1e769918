"""Metrics (counted where every call passes, refused ones included) and JSON-lines logs with a
request id."""

from __future__ import annotations

import io
import json
import logging
import urllib.request

import grpc
import pytest
from prometheus_client import REGISTRY, generate_latest, start_http_server

from curvscope import Client, CurvscopeError
from curvscope_service.config import ServerConfig
from curvscope_service.in_process import InProcessServer
from curvscope_service.logging_setup import configure_logging
from curvscope_service.memory_plan import CALIBRATION_PRODUCTS


def _sample(name: str, **labels) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


GET_CAPABILITIES = "/curvscope.v1.Curvscope/GetCapabilities"
ANALYZE = "/curvscope.v1.Curvscope/Analyze"


def test_requests_analyses_queue_and_store_are_measured(tmp_path, digits_files):
    model_path, data_path = digits_files
    tokens = tmp_path / "tokens"
    tokens.write_text("good\n")
    before = {
        "ok": _sample("curvscope_requests_total", method=GET_CAPABILITIES, code="OK"),
        "unauthenticated": _sample("curvscope_requests_total", method=GET_CAPABILITIES, code="UNAUTHENTICATED"),
        "denied": _sample("curvscope_requests_total", method=ANALYZE, code="PERMISSION_DENIED"),
        "bad": _sample("curvscope_requests_total", method=ANALYZE, code="INVALID_ARGUMENT"),
        "analysis": _sample("curvscope_analysis_seconds_count", analysis="hessian_eigen", status="OK"),
        "wait": _sample("curvscope_queue_wait_seconds_count", device="cpu"),
        "hvps": _sample("curvscope_hvps_total", device="cpu", curvature="hessian"),
        "rpc": _sample("curvscope_rpc_seconds_count", method=ANALYZE, code="OK"),
    }
    with InProcessServer(ServerConfig(store=tmp_path / "store", token_file=tokens)) as server:
        for token in ("", "wrong"):
            with Client(server.target, token=token) as refused, pytest.raises(CurvscopeError):
                refused.capabilities() if not token else refused.analyze("sha256:" + "0" * 64)
        with Client(server.target, token="good") as client:
            client.capabilities()
            report = client.analyze(model_path, data_path, eigen=2, seed=31)
            with pytest.raises(CurvscopeError):
                client.analyze(model_path, data_path, loss="hinge")
            blob_bytes = model_path.stat().st_size + data_path.stat().st_size
            store_bytes = _sample("curvscope_store_bytes", kind="blobs")
    hvps = report.results.hessian_eigen.hvps
    assert _sample("curvscope_requests_total", method=GET_CAPABILITIES, code="OK") == before["ok"] + 1
    # Refused by the auth interceptor, and still counted.
    assert _sample("curvscope_requests_total", method=GET_CAPABILITIES, code="UNAUTHENTICATED") == before["unauthenticated"] + 1
    assert _sample("curvscope_requests_total", method=ANALYZE, code="PERMISSION_DENIED") == before["denied"] + 1
    assert _sample("curvscope_requests_total", method=ANALYZE, code="INVALID_ARGUMENT") == before["bad"] + 1
    assert _sample("curvscope_rpc_seconds_count", method=ANALYZE, code="OK") == before["rpc"] + 1
    assert _sample("curvscope_analysis_seconds_count", analysis="hessian_eigen", status="OK") == before["analysis"] + 1
    assert _sample("curvscope_queue_wait_seconds_count", device="cpu") == before["wait"] + 1
    # Exactly the products the report says it used, and the memory plan's calibration.
    assert _sample("curvscope_hvps_total", device="cpu", curvature="hessian") - before["hvps"] == hvps + CALIBRATION_PRODUCTS
    assert store_bytes == blob_bytes
    assert _sample("curvscope_queue_depth", device="cpu") == 0
    assert _sample("curvscope_device_memory_peak_bytes", device="cpu") > 10 << 20
    text = generate_latest(REGISTRY).decode()
    for name in ("curvscope_requests_total", "curvscope_analysis_seconds_bucket", "curvscope_queue_wait_seconds_bucket",
                 "curvscope_store_bytes", "curvscope_hvps_total", "curvscope_device_memory_peak_bytes"):
        assert name in text, name


def test_metrics_are_served_over_http():
    server, thread = start_http_server(0, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5) as response:
            body = response.read().decode()
        assert "curvscope_rpc_seconds" in body and "curvscope_queue_depth" in body
    finally:
        server.shutdown()
        thread.join(5)


def test_json_logs_carry_the_request_id(tmp_path, digits_files):
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    configure_logging("json", stream=stream)
    try:
        with InProcessServer(ServerConfig(store=tmp_path / "store")) as server:
            with grpc.insecure_channel(server.target) as channel:
                from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb
                from curvscope._proto.curvscope.v1 import curvscope_pb2_grpc as pb_grpc

                _, call = pb_grpc.CurvscopeStub(channel).GetCapabilities.with_call(
                    pb.GetCapabilitiesRequest(), metadata=(("x-request-id", "ci-build-42"),), timeout=10)
                assert ("x-request-id", "ci-build-42") in call.trailing_metadata()
            with Client(server.target) as client:
                client.analyze(digits_files[0], digits_files[1], eigen=1, seed=32)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines and all({"time", "level", "logger", "message", "request_id"} <= set(line) for line in lines)
    calls = {line["method"]: line for line in lines if "method" in line}
    assert calls[GET_CAPABILITIES]["request_id"] == "ci-build-42" and calls[GET_CAPABILITIES]["code"] == "OK"
    analyze_id = calls[ANALYZE]["request_id"]
    assert len(analyze_id) == 16 and analyze_id != "ci-build-42"


def test_plain_logs_and_bad_format():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("plain", stream=stream)
        logging.getLogger("curvscope.test").info("hello")
        with pytest.raises(ValueError, match="log format"):
            configure_logging("xml")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert "INFO curvscope.test [] hello" in stream.getvalue()
