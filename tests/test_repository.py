"""Repository rules: generated stubs match the proto, buf lint is clean, and the thin client
installs and works in a virtual environment without torch, numpy or cvxpy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_generated_stubs_are_up_to_date():
    result = subprocess.run([sys.executable, "scripts/gen_proto.py", "--check"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_is_clean(extra_tool):
    result = subprocess.run([extra_tool("buf", "buf-bin"), "lint"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_runs_the_readme_test_command_strictly():
    readme = (REPO / "README.md").read_text().splitlines()
    command = readme[next(i for i, line in enumerate(readme) if line.startswith("# 2. ")) + 1]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    # The same command last (its status is the script's), under set -e and with CI set, so a
    # missing program fails its test instead of skipping it.
    assert ci[-1] == command and command.endswith("python3 -m pytest")
    assert "set -euo pipefail" in ci and "export CI=1" in ci


def test_thin_client_installs_and_runs_without_torch(tmp_path, server, digits_files):
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    python = environment / "bin" / "python"
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", str(REPO / "client")],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    installed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout
    names = {line.split("==")[0].lower() for line in installed.splitlines()}
    assert "grpcio" in names and "protobuf" in names
    assert not names & {"torch", "numpy", "cvxpy", "scipy", "safetensors"}, names

    model_path, data_path = digits_files
    env = {**os.environ, "CURVSCOPE_SERVER": server.target}
    analyze = subprocess.run(
        [environment / "bin" / "curvscope", "analyze", str(model_path), "--data", str(data_path), "--eigen", "2",
         "--json", str(tmp_path / "report.json")], capture_output=True, text=True, env=env, timeout=120)
    assert analyze.returncode == 0, analyze.stderr
    assert "largest" in analyze.stdout and (tmp_path / "report.json").is_file()
    local = subprocess.run([environment / "bin" / "curvscope", "analyze", str(model_path), "--local"],
                           capture_output=True, text=True, timeout=60)
    assert local.returncode == 2 and "curvscope-service" in local.stderr and "Traceback" not in local.stderr
    # A PNG plot needs the optional extra; the error names it before any work is sent.
    png = subprocess.run([environment / "bin" / "curvscope", "analyze", str(model_path), "--data", str(data_path),
                          "--plot", str(tmp_path / "plot.png")], capture_output=True, text=True, env=env, timeout=60)
    assert png.returncode == 2 and "curvscope[plot]" in png.stderr and not (tmp_path / "plot.png").exists()

    # The CI gate with the thin client alone: starter policy, a run against the server, every output.
    policy = tmp_path / "curvscope.toml"
    assert subprocess.run([environment / "bin" / "curvscope", "gate", "--init", "--policy", str(policy)],
                          capture_output=True, timeout=60).returncode == 0
    outputs = {name: tmp_path / f"gate.{name}" for name in ("xml", "md", "json", "html")}
    gate = subprocess.run(
        [environment / "bin" / "curvscope", "gate", "--policy", str(policy), str(model_path), "--data", str(data_path),
         "--baseline", str(tmp_path / "report.json"), "--junit", str(outputs["xml"]), "--markdown", str(outputs["md"]),
         "--json", str(outputs["json"]), "--html", str(outputs["html"])],
        capture_output=True, text=True, env=env, timeout=120)
    assert gate.returncode == 0, gate.stdout + gate.stderr
    assert "curvscope gate: " in gate.stdout and all(path.is_file() for path in outputs.values())
    assert json.loads(outputs["json"].read_text())["exit_code"] == gate.returncode
