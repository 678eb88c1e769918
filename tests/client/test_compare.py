"""curvscope compare: two reports side by side."""

from __future__ import annotations

import json

from curvscope.cli import main
from curvscope.compare import compare_rows, flatten


def report(top: float, extra: dict | None = None) -> dict:
    results = {"hessian_eigen": {"largest": [top, 1.0], "smallest": [], "residuals": {"largest": [0.0, 0.0], "smallest": []},
                                 "converged": True, "hvps": 10, "seconds": 0.1, "tolerance": 1e-3}}
    results.update(extra or {})
    return {"schema": "curvscope.report/v1", "model": {"sha256": "a" * 64, "format": "safetensors", "num_parameters": 10},
            "device": "cpu", "seconds": 1.0, "results": results}


def test_rows_hold_both_values_and_the_change():
    a = report(2.0)
    b = report(3.0, {"hessian_density": {"grid": [0.0, 1.0], "density": [1.0, 2.0], "nodes": [0.5], "weights": [1.0],
                                         "negative_mass": 0.25, "density_stderr": [0.1, 0.2]}})
    rows = {row[0]: row[1:] for row in compare_rows(a, b)}
    assert rows["results.hessian_eigen.largest[0]"] == ["2", "3", "+1 (+50%)"]
    assert rows["results.hessian_eigen.largest[1]"] == ["1", "1", "="]
    assert rows["results.hessian_density.negative_mass"] == ["-", "0.25", "changed"]  # only in B
    assert "results.hessian_density.grid[0]" not in rows  # curves are plotted, not tabulated
    assert "results.hessian_density.density_stderr[0]" not in rows
    assert dict(flatten({"x": [1, 2], "y": {"z": True}})) == {"x[0]": 1, "x[1]": 2, "y.z": True}


def test_cli(tmp_path, capsys):
    first, second = tmp_path / "main.json", tmp_path / "pr.json"
    first.write_text(json.dumps(report(2.0)))
    second.write_text(json.dumps(report(2.5)))
    assert main(["compare", str(first), str(second), "--changed-only", "--markdown", str(tmp_path / "c.md")]) == 0
    out = capsys.readouterr().out
    assert "main.json" in out and "pr.json" in out and "+0.5 (+25%)" in out
    assert "largest[1]" not in out  # unchanged
    assert "| `results.hessian_eigen.largest[0]` | 2 | 2.5 | +0.5 (+25%) |" in (tmp_path / "c.md").read_text()
    (tmp_path / "bad.json").write_text("{")
    assert main(["compare", str(first), str(tmp_path / "bad.json")]) == 2
    assert "is not JSON" in capsys.readouterr().err
