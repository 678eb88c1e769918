"""The analyze flags that reach the request (curvature, trace and density settings), and the
connection flags every server-facing subcommand shares."""

from __future__ import annotations

import argparse
import json

import pytest

from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb
from curvscope.cli import _request_options, build_parser, main
from curvscope.client import build_request

MODEL = pb.ModelRef(uri="file:///models/m.safetensors")


def request_for(*flags: str) -> pb.AnalyzeRequest:
    args = build_parser().parse_args(["analyze", "m.safetensors", *flags])
    return build_request(MODEL, **_request_options(args))


def spec_of(request: pb.AnalyzeRequest, name: str):
    found = [getattr(spec, name) for spec in request.analyses if spec.WhichOneof("analysis") == name]
    assert len(found) == 1, request
    return found[0]


@pytest.mark.parametrize(("flag", "enum"), [
    ("hessian", pb.CURVATURE_HESSIAN), ("ggn", pb.CURVATURE_GGN), ("fisher", pb.CURVATURE_FISHER),
    ("empirical_fisher", pb.CURVATURE_EMPIRICAL_FISHER)])
def test_curvature_flag_sets_the_request_option(flag, enum):
    assert request_for("--curvature", flag).options.curvature == enum


def test_defaults_leave_every_setting_to_the_server():
    request = request_for("--trace", "--density")
    assert request.options.curvature == pb.CURVATURE_UNSPECIFIED
    assert spec_of(request, "hessian_trace") == pb.HessianTraceSpec()
    assert spec_of(request, "hessian_density") == pb.HessianDensitySpec()
    assert [spec.WhichOneof("analysis") for spec in request.analyses] == ["hessian_trace", "hessian_density"]


def test_trace_and_density_flags_fill_their_specs():
    request = request_for("--trace", "--trace-method", "hutchpp", "--trace-max-hvps", "120", "--trace-tolerance",
                          "0.01", "--frobenius", "--density", "--density-steps", "40", "--density-probes", "3",
                          "--density-grid", "200", "--density-sigma", "0.001", "--density-negative-tolerance", "0",
                          "--eigen", "3")
    assert spec_of(request, "hessian_trace") == pb.HessianTraceSpec(
        method=pb.TRACE_METHOD_HUTCH_PLUS_PLUS, max_hvps=120, relative_tolerance=0.01, frobenius=True)
    assert spec_of(request, "hessian_density") == pb.HessianDensitySpec(
        lanczos_steps=40, num_probes=3, grid_points=200, sigma=0.001, negative_tolerance=0.0)
    # An explicit 0 reaches the server (it counts every negative node); no flag leaves it unset.
    assert spec_of(request, "hessian_density").HasField("negative_tolerance")
    assert not spec_of(request_for("--density"), "hessian_density").HasField("negative_tolerance")
    assert spec_of(request, "hessian_eigen").top_k == 3
    for name, enum in (("hutchinson", pb.TRACE_METHOD_HUTCHINSON), ("xtrace", pb.TRACE_METHOD_XTRACE)):
        assert spec_of(request_for("--trace", "--trace-method", name), "hessian_trace").method == enum


def test_unknown_choices_are_usage_errors(capsys):
    for flags in (["--curvature", "kfac"], ["--trace", "--trace-method", "hutch"]):
        with pytest.raises(SystemExit) as caught:
            build_parser().parse_args(["analyze", "m.safetensors", *flags])
        assert caught.value.code == 2
        assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="curvature must be one of"):
        build_request(MODEL, curvature="kfac")
    with pytest.raises(ValueError, match="trace_method must be one of"):
        build_request(MODEL, trace=True, trace_method="exact")


def test_curvature_trace_and_density_flags_end_to_end(server, digits_files, tmp_path):
    model_path, data_path = digits_files
    out = tmp_path / "ggn.json"
    assert main(["analyze", str(model_path), "--data", str(data_path), "--server", server.target,
                 "--curvature", "ggn", "--eigen", "1", "--smallest", "1",
                 "--trace", "--trace-method", "hutchinson", "--trace-max-hvps", "12", "--frobenius",
                 "--density", "--density-steps", "15", "--density-probes", "2", "--density-grid", "64",
                 "--density-negative-tolerance", "0.01", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["curvature"] == "ggn"
    results = report["results"]
    # The GGN of a cross-entropy network is positive semi-definite.
    eigen = results["hessian_eigen"]
    assert eigen["smallest"][0] >= -1e-4 * eigen["largest"][0]
    trace = results["hessian_trace"]
    assert trace["method"] == "hutchinson" and trace["hvps"] <= 12 and "frobenius_squared" in trace
    assert trace["estimate"] > 0
    density = results["hessian_density"]
    assert len(density["grid"]) == len(density["density"]) == 64
    assert len(density["nodes"]) == 2 * 15  # one Gauss quadrature of `steps` nodes per probe
    assert density["negative_tolerance"] == 0.01 and len(density["density_stderr"]) == 64
    # The GGN has no negative eigenvalues beyond rounding.
    assert density["negative_mass"] == 0.0
    # The default is the Hessian, whose report says so.
    assert main(["analyze", str(model_path), "--data", str(data_path), "--server", server.target,
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["curvature"] == "hessian"


def test_every_analysis_has_a_flag_and_any_setting_can_be_set():
    request = request_for("--epsilon-sharpness", "--adaptive-sharpness", "--weight-spectra",
                          "--set", "non_uniformity.method=gauss_newton", "--set", "non_uniformity.batch_size=32",
                          "--set", "lipschitz.methods=lipsdp_neuron,lower", "--set", "lipschitz.split_size=2",
                          "--set", "adaptive_sharpness.norm=l2", "--set", "adaptive_sharpness.average_case=true",
                          "--set", "epsilon_sharpness.epsilon=0.01")
    assert [spec.WhichOneof("analysis") for spec in request.analyses] == [
        "epsilon_sharpness", "adaptive_sharpness", "weight_spectra", "non_uniformity", "lipschitz"]
    assert spec_of(request, "non_uniformity") == pb.NonUniformitySpec(
        method=pb.NON_UNIFORMITY_METHOD_GAUSS_NEWTON, batch_size=32)
    assert spec_of(request, "lipschitz") == pb.LipschitzSpec(
        methods=[pb.LIPSCHITZ_METHOD_LIPSDP_NEURON, pb.LIPSCHITZ_METHOD_LOWER], split_size=2)
    assert spec_of(request, "adaptive_sharpness") == pb.AdaptiveSharpnessSpec(norm=pb.SHARPNESS_NORM_L2, average_case=True)
    assert spec_of(request, "epsilon_sharpness") == pb.EpsilonSharpnessSpec(epsilon=0.01)
    # Only --set hessian_eigen.* keeps the default eigenvalue; the full enum names work too.
    assert spec_of(request_for("--set", "hessian_eigen.tolerance=1e-4"), "hessian_eigen") == pb.HessianEigenSpec(
        top_k=1, tolerance=1e-4)
    assert spec_of(request_for("--set", "lipschitz.solver=SDP_SOLVER_SCS"), "lipschitz").solver == pb.SDP_SOLVER_SCS


@pytest.mark.parametrize(("setting", "message"), [
    ("lipschitz", "write ANALYSIS.SETTING=VALUE"),
    ("lipschitz.split_size", "write ANALYSIS.SETTING=VALUE"),
    ("kfac.damping=1", "unknown analysis 'kfac'"),
    ("lipschitz.depth=3", "lipschitz has no setting 'depth' (settings: methods, solver"),
    ("lipschitz.methods=magic", "lipschitz.methods must be one of naive, eclipse_fast"),
    ("non_uniformity.batch_size=-2", "must be a whole number >= 0"),
    ("adaptive_sharpness.rho=wide", "adaptive_sharpness.rho must be a number"),
    ("adaptive_sharpness.adaptive=maybe", "must be true or false"),
    ("weight_spectra.layers=1", "it takes no settings"),
])
def test_bad_settings_are_usage_errors_before_anything_is_sent(setting, message, capsys):
    # The server address is unreachable: exit 2 proves the flag was refused before any call.
    assert main(["analyze", "m.safetensors", "--server", "127.0.0.1:1", "--set", setting]) == 2
    assert message in capsys.readouterr().err


def test_sharpness_measures_and_weight_spectra_end_to_end(server, digits_files, tmp_path):
    model_path, data_path = digits_files
    out = tmp_path / "report.json"
    assert main(["analyze", str(model_path), "--data", str(data_path), "--server", server.target,
                 "--epsilon-sharpness", "--set", "epsilon_sharpness.max_iterations=5",
                 "--adaptive-sharpness", "--set", "adaptive_sharpness.steps=3", "--weight-spectra",
                 "--set", "non_uniformity.method=gauss_newton", "--set", "non_uniformity.max_samples=64",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {"epsilon_sharpness", "adaptive_sharpness", "weight_spectra", "non_uniformity"}
    assert results["non_uniformity"]["method"] == "gauss_newton"
    assert results["epsilon_sharpness"]["value"] >= 0
    assert results["weight_spectra"]["layers"]


# -- connection flags ---------------------------------------------------------------------------
CONNECTION = {"--server", "--local", "--token-file", "--tls", "--tls-ca", "--tls-cert", "--tls-key"}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_server_facing_subcommand_has_the_same_connection_flags():
    commands = _subparsers(build_parser())
    for name in ("analyze", "gate"):
        groups = {group.title: group for group in commands[name]._action_groups}
        assert "server connection" in groups, name
        flags = {flag for action in groups["server connection"]._group_actions for flag in action.option_strings}
        assert flags == CONNECTION, name
    gate = commands["gate"].parse_args(["--policy", "p.toml", "m", "--tls-ca", "ca.pem", "--tls-cert", "c.pem",
                                        "--tls-key", "c.key", "--server", "h:1"])
    assert (str(gate.tls_cert), str(gate.tls_key), gate.server) == ("c.pem", "c.key", "h:1")


def test_gate_refuses_half_a_client_certificate(tmp_path, capsys):
    policy = tmp_path / "p.toml"
    assert main(["gate", "--init", "--policy", str(policy)]) == 0
    capsys.readouterr()
    # Checked before anything is sent: a usage error, not an unreachable server.
    assert main(["gate", "--policy", str(policy), "m.safetensors", "--server", "127.0.0.1:1",
                 "--tls-cert", str(tmp_path / "c.pem")]) == 2
    assert "go together" in capsys.readouterr().err


def test_gate_plans_within_the_policy_memory_budget_or_the_flag(digits_files, tmp_path, capsys):
    """The policy's [request] memory_budget reaches the run's plan, --memory-budget overrides it,
    and a budget nothing fits in stops the gate (RESOURCE_EXHAUSTED, as every analysis would
    get it: exit 3) with what to change."""
    policy = tmp_path / "curvscope.toml"
    policy.write_text('[request]\nmemory_budget = "3GB"\n[analyses.hessian_trace]\nmax_hvps = 10\n'
                      '[[checks]]\npath = "results.hessian_trace.estimate"\nfail = {min = -1e9}\n')
    out = tmp_path / "gate.json"
    gate = ["gate", "--policy", str(policy), str(digits_files[0]), "--data", str(digits_files[1]), "--local",
            "--json", str(out)]
    assert main(gate) == 0
    assert json.loads(out.read_text())["report"]["run"]["memory_budget_bytes"] == 3 * 10**9
    assert main(gate + ["--memory-budget", "2GiB"]) == 0
    assert json.loads(out.read_text())["report"]["run"]["memory_budget_bytes"] == 2 * 2**30
    capsys.readouterr()
    assert main(gate + ["--memory-budget", "100kB"]) == 3
    assert "RESOURCE_EXHAUSTED: hessian_trace: XTrace with 10 products (5 probes) needs" in capsys.readouterr().err
