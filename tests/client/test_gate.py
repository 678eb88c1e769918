"""The checkpoint gate: policies, every verdict path with its exit code and files, and a real run
against an in-process server."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import jsonschema
import pytest
from lxml import etree

from curvscope import CurvscopeError, json_schema
from curvscope.cli import main
from curvscope.gate import ERROR, FAIL, PASS, WARN, evaluate, github_annotations, normalize_report, run_policy
from curvscope.policy import STARTER_POLICY, PolicyError, format_path, parse_path, parse_policy, resolve

REPO = Path(__file__).resolve().parents[2]

# The JUnit XML schema Jenkins and Maven Surefire read (jenkins-junit.xsd), as the CI tools use it.
JUNIT_XSD = """<?xml version="1.0" encoding="UTF-8"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" elementFormDefault="qualified">
  <xs:element name="failure">
    <xs:complexType mixed="true">
      <xs:attribute name="type" type="xs:string" use="optional"/>
      <xs:attribute name="message" type="xs:string" use="optional"/>
    </xs:complexType>
  </xs:element>
  <xs:element name="error">
    <xs:complexType mixed="true">
      <xs:attribute name="type" type="xs:string" use="optional"/>
      <xs:attribute name="message" type="xs:string" use="optional"/>
    </xs:complexType>
  </xs:element>
  <xs:element name="skipped">
    <xs:complexType mixed="true">
      <xs:attribute name="type" type="xs:string" use="optional"/>
      <xs:attribute name="message" type="xs:string" use="optional"/>
    </xs:complexType>
  </xs:element>
  <xs:element name="properties">
    <xs:complexType>
      <xs:sequence><xs:element ref="property" minOccurs="0" maxOccurs="unbounded"/></xs:sequence>
    </xs:complexType>
  </xs:element>
  <xs:element name="property">
    <xs:complexType>
      <xs:attribute name="name" type="xs:string" use="required"/>
      <xs:attribute name="value" type="xs:string" use="required"/>
    </xs:complexType>
  </xs:element>
  <xs:element name="system-err" type="xs:string"/>
  <xs:element name="system-out" type="xs:string"/>
  <xs:element name="testcase">
    <xs:complexType>
      <xs:sequence>
        <xs:element ref="skipped" minOccurs="0" maxOccurs="1"/>
        <xs:element ref="error" minOccurs="0" maxOccurs="unbounded"/>
        <xs:element ref="failure" minOccurs="0" maxOccurs="unbounded"/>
        <xs:element ref="system-out" minOccurs="0" maxOccurs="unbounded"/>
        <xs:element ref="system-err" minOccurs="0" maxOccurs="unbounded"/>
      </xs:sequence>
      <xs:attribute name="name" type="xs:string" use="required"/>
      <xs:attribute name="assertions" type="xs:string" use="optional"/>
      <xs:attribute name="time" type="xs:string" use="optional"/>
      <xs:attribute name="classname" type="xs:string" use="optional"/>
      <xs:attribute name="status" type="xs:string" use="optional"/>
    </xs:complexType>
  </xs:element>
  <xs:element name="testsuite">
    <xs:complexType>
      <xs:sequence>
        <xs:element ref="properties" minOccurs="0" maxOccurs="1"/>
        <xs:element ref="testcase" minOccurs="0" maxOccurs="unbounded"/>
        <xs:element ref="system-out" minOccurs="0" maxOccurs="1"/>
        <xs:element ref="system-err" minOccurs="0" maxOccurs="1"/>
      </xs:sequence>
      <xs:attribute name="name" type="xs:string" use="required"/>
      <xs:attribute name="tests" type="xs:string" use="required"/>
      <xs:attribute name="failures" type="xs:string" use="optional"/>
      <xs:attribute name="errors" type="xs:string" use="optional"/>
      <xs:attribute name="time" type="xs:string" use="optional"/>
      <xs:attribute name="disabled" type="xs:string" use="optional"/>
      <xs:attribute name="skipped" type="xs:string" use="optional"/>
      <xs:attribute name="timestamp" type="xs:string" use="optional"/>
      <xs:attribute name="hostname" type="xs:string" use="optional"/>
      <xs:attribute name="id" type="xs:string" use="optional"/>
      <xs:attribute name="package" type="xs:string" use="optional"/>
    </xs:complexType>
  </xs:element>
  <xs:element name="testsuites">
    <xs:complexType>
      <xs:sequence><xs:element ref="testsuite" minOccurs="0" maxOccurs="unbounded"/></xs:sequence>
      <xs:attribute name="name" type="xs:string" use="optional"/>
      <xs:attribute name="time" type="xs:string" use="optional"/>
      <xs:attribute name="tests" type="xs:string" use="optional"/>
      <xs:attribute name="failures" type="xs:string" use="optional"/>
      <xs:attribute name="disabled" type="xs:string" use="optional"/>
      <xs:attribute name="errors" type="xs:string" use="optional"/>
    </xs:complexType>
  </xs:element>
</xs:schema>
"""

POLICY = """
[request]
per_layer = true
[analyses.hessian_eigen]
top_k = 2
[analyses.non_uniformity]
learning_rate = 0.1
batch_size = 32

[[checks]]
name = "sharpness"
path = "results.hessian_eigen.largest[0]"
fail = { max = 10.0, max_increase = 0.5 }
warn = { max = 5.0, max_increase = 0.1 }

[[checks]]
name = "layer sharpness"
path = "per_layer.*.hessian_eigen.largest[0]"
warn = { max = 3.0 }

[[checks]]
name = "SGD stable"
path = "results.non_uniformity.sgd_stable"
fail = { equals = true }
"""


def eigen(largest, smallest=(), converged=True) -> dict:
    return {"largest": list(largest), "smallest": list(smallest),
            "residuals": {"largest": [1e-5] * len(largest), "smallest": [1e-5] * len(smallest)},
            "converged": converged, "hvps": 40, "seconds": 0.5, "tolerance": 1e-3}


def non_uniformity(stable=True) -> dict:
    return {"value": 3.4, "batch_size": 32, "sgd_stable": stable, "stability_eigenvalue": 0.99 if stable else 1.2,
            "learning_rate": 0.1, "method": "exact", "num_samples": 512, "converged": True, "sharpness": 0.7}


def make_report(results: dict, per_layer: dict | None = None, digest: str = "a") -> dict:
    """A report as the server writes it, checked against the shipped schema."""
    report = {"schema": "curvscope.report/v1",
              "model": {"sha256": digest * 64, "format": "safetensors", "num_parameters": 2410},
              "data": {"sha256": "b" * 64, "num_samples": 512}, "loss": {"name": "cross_entropy", "value": 0.25},
              "device": "cpu", "seconds": 1.5, "curvature": "hessian", "precision": "float32", "seed": 0,
              "results": results}
    if per_layer is not None:
        report["per_layer"] = per_layer
    jsonschema.validate(report, json_schema())
    return normalize_report(report)


def standard(top=4.0, layers=(1.0, 2.0), stable=True, digest="a") -> dict:
    return make_report({"hessian_eigen": eigen([top, top / 2]), "non_uniformity": non_uniformity(stable)},
                       {"0": {"hessian_eigen": eigen([layers[0]])}, "fc.1": {"hessian_eigen": eigen([layers[1]])}},
                       digest)


def by_check(result) -> dict:
    out = {}
    for verdict in result.verdicts:
        out.setdefault(verdict.check, []).append(verdict)
    return out


# -- policies -------------------------------------------------------------------------------------
def test_paths_parse_resolve_and_round_trip():
    segments = parse_path('per_layer."fc.1".hessian_eigen.largest[-1]')
    assert segments == (("key", "per_layer"), ("key", "fc.1"), ("key", "hessian_eigen"), ("key", "largest"), ("index", -1))
    assert format_path(segments) == 'per_layer."fc.1".hessian_eigen.largest[-1]'
    data = {"a": {"x": [1, 2, 3], "y.z": [4]}, "b": {"x": [5]}}
    found = [(format_path(path), value) for path, value in resolve(data, parse_path("*.x[*]"))]
    assert found == [("a.x[0]", 1), ("a.x[1]", 2), ("a.x[2]", 3), ("b.x[0]", 5)]
    assert [v for _, v in resolve(data, parse_path('a."y.z"[0]'))] == [4]
    assert list(resolve(data, parse_path("a.x[3]"))) == [] and list(resolve(data, parse_path("c.x[0]"))) == []


def test_starter_policy_explains_itself_and_loads():
    policy = parse_policy(STARTER_POLICY)
    assert {check.analysis for check in policy.checks} == {"hessian_eigen"} == set(policy.analyses)
    assert STARTER_POLICY.count("\n#") > 20  # it is mostly comments: it explains every knob
    request = policy.analyze_request()
    assert request.analyses[0].hessian_eigen.top_k == 3 and request.loss == "cross_entropy"
    assert request.options.memory_budget_bytes == 0  # the server's ceiling unless the policy sets one


@pytest.mark.parametrize("written, expected", [('"8GB"', 8 * 10**9), ('"6 GiB"', 6 * 2**30), ("512000000", 512 * 10**6)])
def test_a_policy_memory_budget_reaches_the_request(written, expected):
    policy = parse_policy(f"[request]\nmemory_budget = {written}\n[[checks]]\npath='loss.value'\nfail={{max=1.0}}")
    assert policy.analyze_request().options.memory_budget_bytes == expected


@pytest.mark.parametrize("text, message", [
    ("checks = 3", "no checks"),
    ("[[checks]\npath = 1", "not valid TOML"),
    ("colour = 1\n[[checks]]\npath='loss.value'\nfail={max=1.0}", "unknown key colour"),
    ("[[checks]]\npath='results.hessian_eigen.larget[0]'\nfail={max=1.0}", "has no field 'larget'; its fields are largest"),
    ("[[checks]]\npath='results.hessian_eigen.largest'\nfail={max=1.0}", "is a list; pick an element like largest[0]"),
    ("[[checks]]\npath='results.hessian_eigen.largest[0'\nfail={max=1.0}", "unexpected '['"),
    ("[[checks]]\npath='loss.value'\nfail={min=2.0, max=1.0}", "min 2.0 is above max 1.0"),
    ("[[checks]]\npath='loss.value'\nfail={equals=true}", "is a number; bound it with min/max"),
    ("[[checks]]\npath='loss.value'\nfail={max_increase=-0.1}", "must be >= 0"),
    ("[[checks]]\npath='loss.value'\nfail={maximum=1.0}", "unknown key maximum"),
    ("[[checks]]\npath='loss.value'", "has no bounds"),
    ("[[checks]]\npath='results.sharpness.gd_stable'\nfail={equals=true}", "add an [analyses.sharpness] table"),
    ("[analyses.hessian_eigen]\n[[checks]]\npath='per_layer.*.hessian_eigen.largest[0]'\nfail={max=1.0}",
     "set per_layer = true"),
    ("[analyses.hessian_eigen]\ntopk = 3\n[[checks]]\npath='loss.value'\nfail={max=1.0}", "[analyses.hessian_eigen]"),
    ("[request]\ncurvature='hessain'\n[[checks]]\npath='loss.value'\nfail={max=1.0}", "curvature must be one of"),
    ("[request]\nmemory_budget='lots'\n[[checks]]\npath='loss.value'\nfail={max=1.0}",
     "memory_budget: 'lots' is not a byte count; write e.g. 8000000000, 8GB"),
    ("[request]\nmemory_budget=1.5\n[[checks]]\npath='loss.value'\nfail={max=1.0}", "memory_budget: 1.5 is not a byte count"),
    ("[[checks]]\nname='a'\npath='loss.value'\nfail={max=1.0}\n[[checks]]\nname='a'\npath='seconds'\nfail={max=1.0}",
     "must be unique"),
])
def test_policy_errors_say_what_to_fix(text, message):
    with pytest.raises(PolicyError, match=None) as caught:
        parse_policy(text)
    assert message in str(caught.value)


# -- verdicts -------------------------------------------------------------------------------------
def test_all_pass():
    result = evaluate(parse_policy(POLICY), standard(4.0), standard(3.9))
    assert [v.status for v in result.verdicts] == [PASS] * 4
    assert result.status == PASS and result.exit_code == 0
    sharp = by_check(result)["sharpness"][0]
    assert sharp.value == 4.0 and sharp.baseline == 3.9
    assert math.isclose(sharp.change, 0.1) and math.isclose(sharp.relative_change, 0.1 / 3.9)


@pytest.mark.parametrize("top, base, status, reason", [
    (6.0, 5.9, WARN, "6 > max 5"),                 # absolute warn bound
    (4.5, 4.0, WARN, "rose 12.5% > 10%"),           # change warn bound: +12.5 %
    (11.0, 10.9, FAIL, "11 > max 10"),              # absolute fail bound wins over the warn one
    (4.0, 2.0, FAIL, "rose 100% > 50%"),            # change fail bound
    (0.5, 0.0, FAIL, "unbounded amount (baseline 0)"),
    (float("nan"), 4.0, FAIL, "is NaN"),           # NaN compares false to every bound: never a pass
])
def test_warn_and_fail_levels(top, base, status, reason):
    report = standard(1.0)
    report["results"]["hessian_eigen"]["largest"][0] = top  # as the server's message would carry it, NaN included
    result = evaluate(parse_policy(POLICY), report, standard(base))
    sharp = by_check(result)["sharpness"][0]
    assert sharp.status == status and reason in sharp.detail, sharp.detail
    assert result.exit_code == (1 if status == FAIL else 0)
    assert json.loads(json.dumps(result.to_dict(), allow_nan=False))["status"] == status  # writable as strict JSON


def test_decreases_and_absolute_changes():
    policy = parse_policy("""
[analyses.lipschitz]
[[checks]]
path = "results.lipschitz.lower"
fail = { max_decrease = 0.25 }
warn = { max_decrease_abs = 1.0, max_increase_abs = 2.0 }
""")
    def lip(lower):
        return make_report({"lipschitz": {"lower": lower, "upper": 30.0, "method": "lipsdp_neuron", "bounds": {}}})
    cases = {20.0: (PASS, ""), 18.5: (WARN, "fell by 1.5 > 1"), 14.0: (FAIL, "fell 30% > 25%"), 22.5: (WARN, "rose by 2.5 > 2")}
    for lower, (status, reason) in cases.items():
        verdict = evaluate(policy, lip(lower), lip(20.0)).verdicts[0]
        assert verdict.status == status and reason in verdict.detail, (lower, verdict)


def test_missing_baseline_follows_the_policy():
    for setting, status in (("pass", PASS), ("warn", WARN), ("fail", FAIL)):
        policy = parse_policy(POLICY.replace("[request]", f"[gate]\nmissing_baseline = '{setting}'\n[request]"))
        sharp = by_check(evaluate(policy, standard(4.0)))["sharpness"][0]
        assert sharp.status == status and "no baseline given: change bounds not checked" in sharp.detail
    # A baseline without the value (an older report without that analysis) reads the same way.
    old = make_report({"non_uniformity": non_uniformity()})
    sharp = by_check(evaluate(parse_policy(POLICY), standard(4.0), old))["sharpness"][0]
    assert sharp.status == WARN and "the baseline has no value here" in sharp.detail
    # Checks without change bounds do not care.
    assert [v.status for v in by_check(evaluate(parse_policy(POLICY), standard(4.0)))["layer sharpness"]] == [PASS, PASS]


def test_failed_and_absent_analyses_are_errors():
    report = make_report({"hessian_eigen": eigen([4.0, 2.0])}, {"0": {"hessian_eigen": eigen([1.0])}})
    failed = evaluate(parse_policy(POLICY), report, report, {"non_uniformity": "UNIMPLEMENTED: not built"})
    error = by_check(failed)["SGD stable"][0]
    assert error.status == ERROR and "the non_uniformity analysis failed: UNIMPLEMENTED: not built" in error.detail
    assert failed.status == FAIL and failed.exit_code == 1
    absent = by_check(evaluate(parse_policy(POLICY), report, report))["SGD stable"][0]
    assert absent.status == ERROR and "the report has no non_uniformity results" in absent.detail


def test_wildcards_give_one_verdict_per_value():
    result = evaluate(parse_policy(POLICY), standard(4.0, layers=(1.0, 3.5)), standard(4.0))
    layers = by_check(result)["layer sharpness"]
    assert [(v.path, v.status) for v in layers] == [("per_layer.0.hessian_eigen.largest[0]", PASS),
                                                   ('per_layer."fc.1".hessian_eigen.largest[0]', WARN)]
    assert layers[1].baseline == 2.0  # matched to the same layer of the baseline
    assert by_check(evaluate(parse_policy(POLICY), standard(stable=False), standard()))["SGD stable"][0].status == FAIL


STDERR_POLICY = """
[request]
per_layer = true
[analyses.hessian_density]
[analyses.hessian_trace]

[[checks]]
name = "negative mass"
path = "results.hessian_density.negative_mass"
stderr = "results.hessian_density.negative_mass_stderr"
sigmas = 2
fail = { max = 0.10 }
warn = { max = 0.05 }

[[checks]]
name = "layer trace"
path = "per_layer.*.hessian_trace.estimate"
stderr = "per_layer.*.hessian_trace.stderr"
borderline = "fail"
fail = { min = 1.0 }
"""


def density_report(mass: float, stderr: float | None, layers=((3.0, 0.5), (1.2, 0.5))) -> dict:
    density = {"grid": [0.0, 1.0], "density": [1.0, 1.0], "nodes": [0.5], "weights": [1.0], "negative_mass": mass}
    if stderr is not None:
        density["negative_mass_stderr"] = stderr
    trace = lambda estimate, error: {"estimate": estimate, "stderr": error, "method": "xtrace", "hvps": 10}  # noqa: E731
    return make_report({"hessian_density": density, "hessian_trace": trace(3.0, 0.1)},
                       {f"block{i}": {"hessian_trace": trace(*layer)} for i, layer in enumerate(layers)})


@pytest.mark.parametrize("mass, stderr, status, reason", [
    (0.02, 0.01, PASS, ""),                                              # [0, 0.04]: clear of 0.05
    (0.04, 0.01, WARN, "borderline (warn): max 0.05 lies in [0.02, 0.06]"),  # the warn bound inside the band
    (0.07, 0.005, WARN, "0.07 - 0.01 > max 0.05"),                       # over the warn bound beyond the band
    (0.09, 0.01, WARN, "borderline (warn): max 0.1 lies in [0.07, 0.11]"),   # the fail bound inside: warn by default
    (0.13, 0.01, FAIL, "0.13 - 0.02 > max 0.1"),                         # over the fail bound beyond the band
    (0.13, 0.0, FAIL, "0.13 > max 0.1"),                                 # no spread: the value itself
    (0.02, None, ERROR, "the report has no standard error at results.hessian_density.negative_mass_stderr"),
])
def test_bounds_on_value_plus_minus_k_standard_errors(mass, stderr, status, reason):
    verdict = by_check(evaluate(parse_policy(STDERR_POLICY), density_report(mass, stderr)))["negative mass"][0]
    assert verdict.status == status and reason in verdict.detail, verdict.detail
    assert "(on value +- 2 x results.hessian_density.negative_mass_stderr)" in verdict.bounds


def test_standard_errors_follow_the_values_wildcards():
    # block0: 3.0 +- 1.0 is clear of min 1; block1: 1.2 +- 1.0 holds 1.0, and borderline = "fail".
    layers = by_check(evaluate(parse_policy(STDERR_POLICY), density_report(0.0, 0.0)))["layer trace"]
    assert [(v.path, v.status) for v in layers] == [("per_layer.block0.hessian_trace.estimate", PASS),
                                                   ("per_layer.block1.hessian_trace.estimate", FAIL)]
    assert "borderline (fail): min 1 lies in [0.2, 2.2]" in layers[1].detail


def test_the_documented_error_bar_check_loads_and_judges_as_described():
    page = (REPO / "docs" / "gate.md").read_text()
    block = page.split("### Error bars")[1].split("```toml\n")[1].split("```")[0]
    policy = parse_policy("[analyses.hessian_density]\n" + block)
    verdict = evaluate(policy, density_report(0.09, 0.01)).verdicts[0]
    assert verdict.status == WARN and "borderline (warn): max 0.1 lies in [0.07, 0.11]" in verdict.detail
    text = " ".join(page.split())
    assert "borderline (warn): max 0.1 lies in [0.07, 0.11]" in text and "0.13 - 0.02 > max 0.1" in text


@pytest.mark.parametrize("extra, message", [
    ("sigmas = 2", "sigmas and borderline need stderr"),
    ("stderr = 'results.hessian_density.negative_mas_stderr'", "has no field 'negative_mas_stderr'"),
    ("stderr = 'results.hessian_density.hvps'\nsigmas = -1", "sigmas must be a number of standard errors >= 0"),
    ("stderr = 'results.hessian_density.negative_mass_stderr'\nborderline = 'maybe'", "borderline must be one of"),
    ("stderr = 'per_layer.*.hessian_trace.stderr'", "more wildcards than the path"),
    ("stderr = 3", "stderr must be the path"),
])
def test_stderr_policy_errors(extra, message):
    text = f"[request]\nper_layer = true\n[analyses.hessian_density]\n[[checks]]\npath = 'results.hessian_density.negative_mass'\n{extra}\nfail = {{ max = 0.1 }}"
    with pytest.raises(PolicyError) as caught:
        parse_policy(text)
    assert message in str(caught.value)


def test_github_annotations_escape_workflow_commands():
    result = evaluate(parse_policy(POLICY), standard(11.0, layers=(1.0, 3.5)), standard(10.9))
    lines = github_annotations(result)
    assert len(lines) == 2
    assert lines[0].startswith("::error title=curvscope gate%3A sharpness::FAIL results.hessian_eigen.largest[0] = 11")
    assert lines[1].startswith("::warning title=curvscope gate%3A layer sharpness::WARN")


# -- one request, or one per analysis when one of them fails ---------------------------------------
def test_a_failing_analysis_is_isolated():
    policy = parse_policy(POLICY)
    calls = []

    def runner(request):
        names = [spec.WhichOneof("analysis") for spec in request.analyses]
        calls.append(names)
        if "non_uniformity" in names:
            raise CurvscopeError("INVALID_ARGUMENT", "batch_size 32 is larger than the 16 samples of the data")
        return standard(4.0)

    report, failed = run_policy(policy, runner)
    assert calls == [["hessian_eigen", "non_uniformity"], ["hessian_eigen"], ["non_uniformity"]]
    assert failed == {"non_uniformity": "INVALID_ARGUMENT: batch_size 32 is larger than the 16 samples of the data"}
    assert report["results"]["hessian_eigen"]["largest"][0] == 4.0


def test_an_aborted_solve_is_retried_alone():
    calls = []

    def runner(request):
        names = [spec.WhichOneof("analysis") for spec in request.analyses]
        calls.append(names)
        if len(calls) == 1:  # the solver process was killed during the first, combined request
            raise CurvscopeError("ABORTED", "the solver process was killed (SIGKILL); retry the request")
        return standard(4.0)

    report, failed = run_policy(parse_policy(POLICY), runner)
    assert calls == [["hessian_eigen", "non_uniformity"], ["hessian_eigen"], ["non_uniformity"]]
    assert failed == {} and report["results"]["hessian_eigen"]["largest"][0] == 4.0


@pytest.mark.parametrize("code, expected_calls", [("UNAVAILABLE", 1), ("INVALID_ARGUMENT", 3), ("ABORTED", 3)])
def test_errors_common_to_every_analysis_stop_the_gate(code, expected_calls):
    calls = []

    def runner(request):
        calls.append(request)
        raise CurvscopeError(code, "no")

    with pytest.raises(CurvscopeError) as caught:
        run_policy(parse_policy(POLICY), runner)
    assert caught.value.code == code and len(calls) == expected_calls


# -- the command line -----------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path):
    def write(name, data):
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        return path
    return write


def _xsd():
    return etree.XMLSchema(etree.fromstring(JUNIT_XSD.encode()))


@pytest.mark.parametrize("top, expected_exit, failures, errors", [(4.0, 0, 0, 0), (11.0, 1, 1, 0), (None, 1, 0, 2)])
def test_cli_verdicts_exit_codes_and_files(files, tmp_path, capsys, monkeypatch, top, expected_exit, failures, errors):
    summary = files("summary.md", "earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    report = standard(top) if top is not None else make_report({"non_uniformity": non_uniformity()}, {})
    out = {kind: tmp_path / f"gate.{kind}" for kind in ("xml", "md", "json", "html")}
    code = main(["gate", "--policy", str(files("policy.toml", POLICY)), "--report", str(files("r.json", report)),
                 "--baseline", str(files("base.json", standard(3.9))), "--junit", str(out["xml"]),
                 "--markdown", str(out["md"]), "--json", str(out["json"]), "--html", str(out["html"])])
    assert code == expected_exit
    printed = capsys.readouterr().out
    assert "curvscope gate: " + ("PASS" if expected_exit == 0 else "FAIL") in printed

    schema = _xsd()
    junit = etree.parse(str(out["xml"]))
    assert schema.validate(junit), schema.error_log
    suite = junit.getroot()[0]
    assert (int(suite.get("failures")), int(suite.get("errors"))) == (failures, errors)
    assert len(suite.findall("testcase")) == int(suite.get("tests")) == len(json.loads(out["json"].read_text())["verdicts"])

    gate = json.loads(out["json"].read_text())
    assert gate["exit_code"] == expected_exit and gate["report"] == report
    assert normalize_report(gate) == report  # a gate's output serves as the next run's baseline
    markdown = out["md"].read_text()
    assert "| check | path |" in markdown and summary.read_text() == "earlier step\n" + markdown
    assert ("::error" in printed) == (expected_exit == 1)
    assert "<svg" in out["html"].read_text() or top is None


def test_cli_input_errors_exit_2(files, tmp_path, capsys):
    policy = files("policy.toml", POLICY)
    report = files("r.json", standard())
    assert main(["gate", "--policy", str(files("bad.toml", "[[checks]]\npath='x'\nfail={max=1.0}")), "--report", str(report)]) == 2
    assert "has no field 'x'" in capsys.readouterr().err
    assert main(["gate", "--policy", str(policy), "--report", str(files("bad.json", {"schema": "other"}))]) == 2
    assert "is not a curvscope report" in capsys.readouterr().err
    bad = {**standard(), "colour": "red"}
    assert main(["gate", "--policy", str(policy), "--report", str(files("bad2.json", bad))]) == 2
    assert "colour" in capsys.readouterr().err
    assert main(["gate", "--policy", str(policy)]) == 2  # neither MODEL nor --report
    assert main(["gate", "--policy", str(tmp_path / "none.toml"), "--report", str(report)]) == 2
    assert "cannot read the policy" in capsys.readouterr().err
    # A baseline that is not there yet (the first run on main) only skips the change bounds.
    assert main(["gate", "--policy", str(policy), "--report", str(report), "--baseline", str(tmp_path / "no.json")]) == 0
    assert "no baseline at" in capsys.readouterr().err


def test_cli_init_writes_a_policy_once(tmp_path, capsys):
    target = tmp_path / "curvscope.toml"
    assert main(["gate", "--init", "--policy", str(target)]) == 0
    assert target.read_text() == STARTER_POLICY
    assert main(["gate", "--init", "--policy", str(target)]) == 2 and "--force" in capsys.readouterr().err
    assert main(["gate", "--init", "--policy", str(target), "--force"]) == 0


# -- against a real server ----------------------------------------------------------------------
E2E_POLICY = """
[analyses.hessian_eigen]
top_k = 2
{extra}
[[checks]]
name = "sharpness"
path = "results.hessian_eigen.largest[0]"
fail = {{ max = {limit} }}
{check}
"""


def test_gate_against_a_server(server, client, digits_files, files, tmp_path, capsys):
    model_path, data_path = digits_files
    sharpness = client.analyze(model_path, data_path, eigen=2).results.hessian_eigen.largest[0]
    args = [str(model_path), "--data", str(data_path), "--server", server.target, "--json", str(tmp_path / "g.json")]

    passing = files("pass.toml", E2E_POLICY.format(extra="", check="", limit=2 * sharpness))
    assert main(["gate", "--policy", str(passing)] + args) == 0
    gate = json.loads((tmp_path / "g.json").read_text())
    assert gate["verdicts"][0]["value"] == sharpness  # same seed, same server: the same number
    jsonschema.validate(gate["report"], json_schema())

    failing = files("fail.toml", E2E_POLICY.format(extra="", check="", limit=0.5 * sharpness))
    assert main(["gate", "--policy", str(failing)] + args) == 1
    assert "FAIL" in capsys.readouterr().out

    # The server refuses one analysis: the others still count and that one is its own verdict.
    refused = files("refused.toml", E2E_POLICY.format(
        extra="[analyses.sharpness]\nlearning_rate = -1.0", limit=2 * sharpness,
        check='[[checks]]\nname = "GD stable"\npath = "results.sharpness.gd_stable"\nfail = { equals = true }'))
    assert main(["gate", "--policy", str(refused)] + args) == 1
    verdicts = {v["check"]: v for v in json.loads((tmp_path / "g.json").read_text())["verdicts"]}
    assert verdicts["sharpness"]["status"] == PASS
    assert verdicts["GD stable"]["status"] == ERROR
    assert "INVALID_ARGUMENT" in verdicts["GD stable"]["reasons"][0] and "learning_rate" in verdicts["GD stable"]["reasons"][0]

    assert main(["gate", "--policy", str(passing), str(tmp_path / "nope.pt2"), "--server", server.target]) == 2
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    assert main(["gate", "--policy", str(passing), str(model_path), "--data", str(data_path),
                 "--server", f"127.0.0.1:{free_port}", "--timeout", "5", "--connect-timeout", "1"]) == 3
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_documented_examples_load_and_match_the_docs():
    docs = REPO / "docs"
    policy = parse_policy((docs / "examples" / "curvscope.toml").read_text())
    assert {check.analysis for check in policy.checks} == set(policy.analyses)
    page = (docs / "gate.md").read_text()
    for name in ("github-actions.yml", "gitlab-ci.yml"):
        example = (docs / "examples" / name).read_text().split("\n", 1)[1]  # less its "where it goes" line
        assert example.strip() in page, name
