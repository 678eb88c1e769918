"""``curvscope analyze --local`` run as a user runs it, in a subprocess: a hostile file exits 2
and a bug in the engine exits 3, each with one line on stderr and never a Python traceback."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

CLI = "import sys\nfrom curvscope.cli import main\nsys.exit(main())\n"
# The same CLI, its engine replaced by one that fails as a bug would.
BROKEN_ENGINE = """
import sys
from curvscope_service import engine

def broken(*args, **kwargs):
    raise RuntimeError("engine bug\\nTraceback (most recent call last): the second line")

engine.run_analysis = broken
from curvscope.cli import main
sys.exit(main())
"""


def _analyze_local(program: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", program, "analyze", *args, "--local"],
                          capture_output=True, text=True, timeout=300)


def _one_line_no_traceback(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_safetensors_header_nested_200000_deep_is_an_input_error(tmp_path: Path):
    header = b'{"__metadata__": {"architecture": "sequential"}, "w": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    model = tmp_path / "deep.safetensors"
    model.write_bytes(struct.pack("<Q", len(header)) + header)
    done = _analyze_local(CLI, str(model), "--weight-spectra")
    line = _one_line_no_traceback(done.stderr)
    assert done.returncode == 2, done.stderr
    assert line.startswith("curvscope: INVALID_ARGUMENT: ") and "deep" in line


def test_a_bug_in_the_engine_exits_3_with_one_line(digits_files):
    model_path, data_path = digits_files
    done = _analyze_local(BROKEN_ENGINE, str(model_path), "--data", str(data_path))
    line = _one_line_no_traceback(done.stderr)
    assert done.returncode == 3, done.stderr
    assert line.startswith("curvscope: internal error: RuntimeError: engine bug")
    assert "second line" not in line


def test_input_errors_exit_2_with_one_line(digits_files, tmp_path: Path):
    model_path, data_path = digits_files
    for args, words in [
        ([str(tmp_path / "missing.safetensors"), "--data", str(data_path)], "is not a file"),
        ([str(model_path), "--data", str(data_path), "--loss", "hinge"], "hinge"),
        ([str(data_path), "--data", str(data_path)], "INVALID_ARGUMENT"),  # data given as the model
    ]:
        done = _analyze_local(CLI, *args)
        line = _one_line_no_traceback(done.stderr)
        assert done.returncode == 2 and words in line, done.stderr
