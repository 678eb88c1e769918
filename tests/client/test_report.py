"""The report's JSON form: proto field names, numbers stay numbers, schema-valid."""

import argparse
import json
import math

import jsonschema
import pytest

from curvscope import Report, json_schema
from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb

REPORT = {
    "schema": "curvscope.report/v1",
    "model": {"sha256": "a" * 64, "format": "safetensors", "num_parameters": 5_000_000_000},
    "data": {"sha256": "b" * 64, "num_samples": 512},
    "loss": {"name": "cross_entropy", "value": 0.25},
    "device": "cpu", "seconds": 1.5, "curvature": "hessian", "precision": "float32", "seed": 3,
    "results": {"hessian_eigen": {
        "largest": [3.0, 2.0], "smallest": [-0.5], "residuals": {"largest": [1e-4, 2e-4], "smallest": [3e-4]},
        "converged": False, "hvps": 0, "seconds": 0.25, "tolerance": 1e-3}},
    "per_layer": {"0": {"hessian_eigen": {
        "largest": [0.0], "smallest": [], "residuals": {"largest": [0.0], "smallest": []},
        "converged": True, "hvps": 4, "seconds": 0.1, "tolerance": 1e-3}}},
}


def test_round_trip_keeps_every_value():
    report = Report.from_dict(REPORT)
    as_dict = report.to_dict()
    assert as_dict["model"]["num_parameters"] == 5_000_000_000  # not a string, as protobuf JSON would give
    assert as_dict["results"]["hessian_eigen"]["converged"] is False  # a false flag is written, not dropped
    assert as_dict["results"]["hessian_eigen"]["hvps"] == 0
    assert as_dict["per_layer"]["0"]["hessian_eigen"]["largest"] == [0.0]
    assert "hessian_trace" not in as_dict["results"]  # absent analyses stay absent
    for key, value in REPORT.items():
        assert as_dict[key] == value, key
    jsonschema.validate(as_dict, json_schema())
    assert json.loads(report.to_json()) == as_dict


def test_schema_rejects_a_report_missing_keys():
    broken = json.loads(json.dumps(REPORT))
    del broken["results"]["hessian_eigen"]["residuals"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json_schema())


def test_optional_fields_only_when_set():
    results = pb.Results(sharpness=pb.SharpnessResult(value=2.0, learning_rate=0.1))
    as_dict = Report(pb.Report(results=results)).to_dict()["results"]["sharpness"]
    assert as_dict["value"] == 2.0 and as_dict["learning_rate"] == 0.1
    assert "gd_stable" not in as_dict and "margin" not in as_dict
    results.sharpness.gd_stable = False
    assert Report(pb.Report(results=results)).to_dict()["results"]["sharpness"]["gd_stable"] is False


def _strict(text: str):
    """Parse as strict JSON: a bare NaN or Infinity (Python's extension) is refused."""
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_values_are_strict_json_and_read_back():
    report = Report.from_dict(REPORT)
    message = report.message
    message.loss.value = float("nan")
    message.results.hessian_eigen.largest[0] = float("inf")
    message.results.hessian_eigen.smallest[0] = float("-inf")
    message.results.hessian_eigen.residuals.largest[1] = float("nan")
    message.results.hessian_trace.estimate = float("nan")
    message.results.hessian_trace.stderr = float("inf")
    data = _strict(report.to_json())
    assert data["loss"]["value"] == "NaN"
    assert data["results"]["hessian_eigen"]["largest"][:1] == ["Infinity"]
    assert data["results"]["hessian_eigen"]["smallest"] == ["-Infinity"]
    assert data["results"]["hessian_eigen"]["residuals"]["largest"] == [1e-4, "NaN"]
    assert data["results"]["hessian_trace"]["stderr"] == "Infinity"
    jsonschema.validate(data, json_schema())
    # Read back as the same floats (a null would read back as 0.0 and pass a gate's bound).
    again = Report.from_dict(data).message
    assert math.isnan(again.loss.value) and math.isnan(again.results.hessian_trace.estimate)
    assert list(again.results.hessian_eigen.largest) == [math.inf, 2.0]
    assert list(again.results.hessian_eigen.smallest) == [-math.inf]
    assert math.isinf(again.results.hessian_trace.stderr)
    _strict(repr(report).removeprefix("Report(").removesuffix(")"))


def test_schema_allows_only_the_spelled_non_finite_values():
    broken = json.loads(json.dumps(REPORT))
    broken["results"]["hessian_eigen"]["largest"][0] = "nan"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json_schema())
    broken["results"]["hessian_eigen"]["largest"][0] = None
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json_schema())
    broken["results"]["hessian_eigen"]["largest"][0] = "NaN"
    broken["results"]["hessian_eigen"]["residuals"]["largest"][0] = "-Infinity"  # a norm is never negative
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json_schema())


def test_analyze_json_writes_strict_json_for_a_diverged_model(tmp_path, capsys):
    from curvscope.cli import _emit

    message = Report.from_dict(REPORT).message
    message.loss.value = float("inf")
    message.results.hessian_eigen.largest[0] = float("nan")
    out = tmp_path / "report.json"
    _emit(Report(message), argparse.Namespace(json=out, plot=None))
    data = _strict(out.read_text())
    assert data["loss"]["value"] == "Infinity" and data["results"]["hessian_eigen"]["largest"][0] == "NaN"
    assert "nan" in capsys.readouterr().out  # the table still shows it
    _emit(Report(message), argparse.Namespace(json="-", plot=None))
    assert _strict(capsys.readouterr().out)["loss"]["value"] == "Infinity"
