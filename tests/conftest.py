"""Fixtures shared across the suite: the digits demo files and an in-process server."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory) -> tuple[Path, Path]:
    """(model.safetensors, data.safetensors): the demo MLP, briefly trained, and 512 digits."""
    from curvscope_service.demo import write_demo_files

    return write_demo_files(tmp_path_factory.mktemp("digits"), steps=100)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server on a free loopback port for the module's tests."""
    from curvscope_service.config import ServerConfig
    from curvscope_service.server import InProcessServer

    root = tmp_path_factory.mktemp("server")
    models = root / "models"
    models.mkdir()
    config = ServerConfig(store=root / "store", model_roots=[models], max_upload_bytes=8 << 20, max_queue_depth=4)
    with InProcessServer(config) as running:
        yield running


@pytest.fixture
def client(server):
    from curvscope import Client

    with Client(server.target) as connected:
        yield connected
