"""Fixtures shared across the suite: the digits demo files, an in-process server, and the
programs some tests run."""

from __future__ import annotations

import os
import shutil
import sysconfig
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
    from curvscope_service.in_process import InProcessServer

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


@pytest.fixture(scope="session")
def extra_tool():
    """``extra_tool(name, package)``: the path of a program the test extra installs (buf,
    hadolint, grpcurl), found in this interpreter's scripts directory rather than on PATH, so the
    suite needs no activated venv. A missing one fails the test."""
    def find(name: str, package: str) -> Path:
        for scheme in (sysconfig.get_default_scheme(), f"{os.name}_user"):
            path = Path(sysconfig.get_path("scripts", scheme)) / name
            if path.is_file():
                return path
        pytest.fail(f"{name} is missing: install the test extra ({package})")
    return find


@pytest.fixture(scope="session")
def system_tool():
    """``system_tool(*names, install=...)``: the path of a system program (a browser, say) under
    the first of its names found on PATH. A missing one skips the test on a developer's machine
    and fails it when ``CI`` is set (.ci/run sets it and installs the program)."""
    def find(*names: str, install: str) -> str:
        for name in names:
            if (path := shutil.which(name)) is not None:
                return path
        message = f"{' or '.join(names)} is not installed ({install})"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{message}; under CI every test runs")
        pytest.skip(message)
    return find
