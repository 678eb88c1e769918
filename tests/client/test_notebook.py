"""docs/examples/quickstart.ipynb runs in a fresh Jupyter kernel against an in-process server,
and its report renders as the HTML report's page."""

from __future__ import annotations

import json
import re
import sys

import nbformat
from nbclient import NotebookClient

from curvscope.gate import format_value
from tests.conftest import REPO

NOTEBOOK = REPO / "docs" / "examples" / "quickstart.ipynb"


def test_quickstart_notebook_runs_and_shows_its_report(tmp_path, server, monkeypatch):
    # A kernel of this interpreter (whatever kernels the machine has installed).
    spec = tmp_path / "kernels" / "curvscope-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "curvscope test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("CURVSCOPE_SERVER", server.target)  # the kernel inherits it
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, kernel_name="curvscope-test", timeout=120,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    three_lines = next(cell for cell in cells if "curvscope.analyze(model" in cell.source and "local" not in cell.source)
    assert len([line for line in three_lines.source.splitlines() if line.strip()]) == 3  # import, call, display
    html = three_lines.outputs[-1]["data"]["text/html"]
    assert html.startswith("<div class='curvscope-report'>") and "<html" not in html and "<body" not in html
    assert "<svg" in html  # the plots, inline
    for style in re.findall(r"<style>(.*?)</style>", html, re.S):
        assert all(rule.startswith(".curvscope-report") for rule in style.strip().splitlines())

    table = cells[2].outputs[-1]["data"]["text/html"]  # report.to_pandas(), rendered by pandas
    assert "results.hessian_eigen.largest[0]" in table and "results.hessian_trace.estimate" in table

    printed = cells[3].outputs[0]["text"].splitlines()
    remote, local = (json.loads(line) for line in printed)
    # The server's and the in-process engine's top eigenvalues of the same bytes.
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(remote, local)) and len(remote) == 3
    # The page shows the server's largest eigenvalue in its table of values, as the HTML report writes it.
    assert f"<td class='num'>{format_value(remote[0])}</td>" in html


def test_quickstart_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
