"""What a run prints while it works, the same for ``--local`` and a served call: a bar with
products and an ETA on a terminal, one line per analysis elsewhere; and ``--memory-budget``."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest

from curvscope import CurvscopeError
from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb
from curvscope._sizes import parse_bytes
from curvscope._table import ProgressLine
from curvscope.cli import main

CLI = "import sys\nfrom curvscope.cli import main\nsys.exit(main())\n"


def _progress(analysis: str, step: int, total: int) -> pb.AnalyzeEvent:
    return pb.AnalyzeEvent(progress=pb.Progress(analysis=analysis, step=step, total=total, current_estimate=1.5))


def _stage(text: str) -> pb.AnalyzeEvent:
    return pb.AnalyzeEvent(progress=pb.Progress(stage=text))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_off_a_terminal_one_line_per_analysis():
    stream, clock = io.StringIO(), Clock()
    line = ProgressLine(stream, clock=clock)
    line(_stage("loading the model (4 MB)"))
    line(_stage("running hessian_eigen"))
    for step in range(1, 31):
        clock.now += 0.5
        line(_progress("hessian_eigen", step, 100))
    line(_stage("running hessian_trace"))
    for step in (8, 16):
        clock.now += 1.0
        line(_progress("hessian_trace", step, 16))
    line.close()
    assert stream.getvalue().splitlines() == [
        "curvscope: hessian_eigen: 30 products in 15 s, estimate 1.5",
        "curvscope: hessian_trace: 16 products in 2 s, estimate 1.5",
    ]


def test_off_a_terminal_a_slow_stage_says_what_it_does_and_a_failure_adds_nothing():
    stream = io.StringIO()
    line = ProgressLine(stream)
    line.SLOW_STAGE_SECONDS = 0.05
    line(_stage("loading the model (900 MB)"))
    select.select([], [], [], 0.3)
    line(_progress("hessian_trace", 8, 100))
    line.close(succeeded=False)
    assert stream.getvalue() == "curvscope: loading the model (900 MB)\n"


def test_on_a_terminal_a_bar_with_products_and_an_eta():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream, clock = Terminal(), Clock()
    line = ProgressLine(stream, clock=clock)
    line(_stage("planning memory"))
    line(_progress("hessian_trace", 8, 100))
    clock.now = 10.0
    line(_progress("hessian_trace", 58, 100))
    shown = stream.getvalue().split("\r\033[K")
    assert shown[1] == "planning memory"
    # 58 products in the 10 s since the stage began: 42 more take 7 s.
    assert shown[-1] == "hessian_trace [###########.........] 58/100 products, ETA 7 s, estimate 1.5"


def test_byte_counts():
    assert parse_bytes("8GB") == 8 * 10**9 and parse_bytes("6 GiB") == 6 * 2**30
    assert parse_bytes("512M") == 512 * 10**6 and parse_bytes("1234") == 1234 and parse_bytes("1.5g") == 1_500_000_000
    with pytest.raises(ValueError, match="8GiB"):
        parse_bytes("lots")


def _local_args(digits_files) -> list[str]:
    model, data = digits_files
    return ["analyze", str(model), "--data", str(data), "--local", "--eigen", "2", "--trace"]


def test_local_prints_one_line_per_analysis_in_a_pipe(digits_files):
    done = subprocess.run([sys.executable, "-c", CLI, *_local_args(digits_files)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert [line.split(":")[1].strip() for line in lines if "products in" in line] == ["hessian_eigen", "hessian_trace"]
    assert "memory    peak" in done.stdout


def test_local_draws_a_bar_on_a_terminal(digits_files):
    """The CLI with its stderr on a pseudo-terminal, as a person runs it."""
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-c", CLI, *_local_args(digits_files)], stdout=subprocess.PIPE,
                               stderr=follower, text=False)
    os.close(follower)
    shown = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 300)
        if not ready:
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    process.communicate(timeout=300)
    os.close(leader)
    assert process.returncode == 0, shown
    text = shown.decode()
    assert "\r\x1b[K" in text and "loading the model" in text and "planning memory" in text
    assert "hessian_eigen [" in text and "hessian_trace [" in text and "/100 products" in text


def test_memory_budget_flag_and_environment_with_local(digits_files, capsys, monkeypatch):
    args = _local_args(digits_files)
    assert main([*args, "--memory-budget", "10kB"]) == 3
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("curvscope: RESOURCE_EXHAUSTED: ") and "10 kB ceiling (--memory-budget)" in error
    monkeypatch.setenv("CURVSCOPE_MEMORY_BUDGET", "10kB")
    assert main(args) == 3
    assert "RESOURCE_EXHAUSTED" in capsys.readouterr().err
    assert main([*args, "--memory-budget", "some"]) == 2


def test_memory_budget_of_a_served_request(client, digits_files):
    model, data = digits_files
    with pytest.raises(CurvscopeError) as refused:
        client.analyze(model, data, eigen=0, trace=True, memory_budget_bytes=10_000)
    assert refused.value.code == "RESOURCE_EXHAUSTED" and "hessian_trace" in refused.value.message
    report = client.analyze(model, data, eigen=0, trace=True, seed=1).to_dict()
    run = report["run"]
    assert run["memory_budget_source"] == "machine" and run["choices"]["hessian_trace.block_size"] == "8"
    assert 0 < run["planned_peak_bytes"] <= run["memory_budget_bytes"] and run["measured_peak_bytes"] > 0


def test_the_server_flag_and_its_environment_default(monkeypatch):
    from curvscope_service.config import config_from_args

    assert config_from_args(["--memory-budget", "60GiB"]).limits.memory_budget_bytes == 60 * 2**30
    monkeypatch.setenv("CURVSCOPE_MEMORY_BUDGET", "40GB")
    assert config_from_args([]).limits.memory_budget_bytes == 40 * 10**9
    with pytest.raises(SystemExit):
        config_from_args(["--memory-budget", "x"])


def test_reports_show_the_run_briefly():
    from curvscope._table import render_report
    from curvscope.html_report import render_html

    report = {"schema": "curvscope.report/v1", "model": {"sha256": "0" * 64, "format": "safetensors",
                                                         "num_parameters": 10},
              "device": "cpu", "seconds": 1.0, "results": {},
              "run": {"planned_peak_bytes": 9_100_000_000, "measured_peak_bytes": 8_700_000_000,
                      "memory_budget_bytes": 20_000_000_000, "memory_budget_source": "machine",
                      "choices": {"vector_dtype": "float32", "hessian_trace.block_size": "4",
                                  "hessian_trace[0].block_size": "8"}}}
    expected = ("peak 8.7 GB measured, 9.1 GB planned (ceiling 20 GB, machine); vector_dtype float32, "
                "hessian_trace.block_size 4")
    assert f"memory    {expected}" in render_report(report).splitlines()
    assert expected in render_html(report)
    assert "memory" not in render_report({**report, "run": {}})
