"""The command line: exit codes, --local and --server giving the same report, demo, serve."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from curvscope.cli import main


def test_analyze_against_a_server_writes_table_and_json(server, digits_files, tmp_path, capsys):
    model_path, data_path = digits_files
    out = tmp_path / "report.json"
    code = main(["analyze", str(model_path), "--data", str(data_path), "--server", server.target,
                 "--eigen", "2", "--smallest", "1", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Hessian eigenvalues" in printed and "largest" in printed and "smallest" in printed
    remote = json.loads(out.read_text())
    assert main(["analyze", str(model_path), "--data", str(data_path), "--local",
                 "--eigen", "2", "--smallest", "1", "--json", str(out)]) == 0
    local = json.loads(out.read_text())
    for key in ("model", "data", "loss", "precision", "seed"):
        assert remote[key] == local[key], key
    remote_eigen, local_eigen = remote["results"]["hessian_eigen"], local["results"]["hessian_eigen"]
    assert remote_eigen["largest"] == local_eigen["largest"]  # same seed, same engine: same numbers


def test_exit_codes(digits_files, tmp_path, capsys):
    model_path, data_path = digits_files
    missing = main(["analyze", str(tmp_path / "nope.pt2"), "--data", str(data_path), "--local"])
    assert missing == 2
    assert "is not a file" in capsys.readouterr().err
    unreachable = main(["analyze", str(model_path), "--data", str(data_path), "--server", f"127.0.0.1:{_free_port()}",
                        "--timeout", "5", "--connect-timeout", "1"])
    assert unreachable == 3
    assert "UNAVAILABLE: could not reach the server" in capsys.readouterr().err
    bad_loss = main(["analyze", str(model_path), "--data", str(data_path), "--local", "--loss", "hinge"])
    assert bad_loss == 2
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "hinge" in err and "Traceback" not in err


def test_demo_prints_a_report(capsys, tmp_path):
    out = tmp_path / "demo.json"
    assert main(["demo", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    eigen = report["results"]["hessian_eigen"]
    assert eigen["converged"] and len(eigen["largest"]) == 5 and len(eigen["smallest"]) == 2
    assert set(report["per_layer"]) == {"0", "2"}
    assert "Hessian eigenvalues" in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_answers_health_and_stops_cleanly_on_sigterm(tmp_path):
    port = _free_port()
    env = {**os.environ, "CURVSCOPE_STORE": str(tmp_path / "store"), "CURVSCOPE_METRICS_PORT": "0"}
    process = subprocess.Popen([sys.executable, "-m", "curvscope.cli", "serve", "--host", "127.0.0.1",
                                "--port", str(port), "--shutdown-grace", "2"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and status is None:
            try:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    status = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service="curvscope.v1.Curvscope"), timeout=1).status
            except grpc.RpcError:
                time.sleep(0.2)
        assert status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert "shutting down" in output and "Traceback" not in output
