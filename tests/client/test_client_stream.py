"""``Client.analyze`` reads the Analyze stream to its end, so the server records a finished
call as OK (stopping at the report would cancel it)."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import REGISTRY

from curvscope import Client

ANALYZE = "/curvscope.v1.Curvscope/Analyze"


def _count(code: str) -> float:
    return REGISTRY.get_sample_value("curvscope_rpc_seconds_count", {"method": ANALYZE, "code": code}) or 0.0


@pytest.fixture
def lingering_server(tmp_path, monkeypatch):
    """A server whose Analyze lingers a moment after sending the report (as a busy server's
    event loop does), so a client that stops at the report cancels a finished call."""
    from curvscope_service.config import ServerConfig
    from curvscope_service.in_process import InProcessServer
    from curvscope_service.servicer import CurvscopeServicer

    original = CurvscopeServicer.Analyze

    async def lingering(self, request, context):
        async for event in original(self, request, context):
            yield event
        await asyncio.sleep(0.3)

    monkeypatch.setattr(CurvscopeServicer, "Analyze", lingering)
    with InProcessServer(ServerConfig(store=tmp_path / "store")) as running:
        yield running


def test_analyze_reads_the_stream_to_its_end_so_the_server_counts_ok(lingering_server, digits_files):
    model_path, data_path = digits_files
    ok, cancelled = _count("OK"), _count("CANCELLED")
    calls = 2
    with Client(lingering_server.target) as client:
        for seed in range(calls):
            assert client.analyze(model_path, data_path, eigen=1, seed=100 + seed).results.hessian_eigen.largest
            # The server finished the call (its status was read) before analyze returned.
            assert _count("OK") == ok + seed + 1
    time.sleep(0.5)  # a cancellation would reach the server's count after the call
    assert _count("CANCELLED") == cancelled
    assert _count("OK") == ok + calls
