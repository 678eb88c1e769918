"""The lipschitz and weight_spectra analyses through the engine: the interval, its order, the
reasons, the caps, and cvxpy kept out of the server's process."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from curvscope_service.engine import AnalysisJob, run_analysis
from curvscope_service.errors import DeadlineExceeded, InvalidInput
from curvscope_service.loading import save_sequential

from conftest import reference_file


def write_sequential(root: Path, name: str, layers: list[dict], input_shape: list[int], seed: int = 0) -> Path:
    from curvscope_service.loading.sequential import build

    torch.manual_seed(seed)
    config = {"input_shape": input_shape, "layers": layers}
    module = build(config)
    path = root / f"{name}.safetensors"
    save_sequential(path, config, module.state_dict())
    return path


def write_data(root: Path, shape: tuple[int, ...], classes: int, n: int = 24) -> Path:
    generator = torch.Generator().manual_seed(5)
    path = root / "data.safetensors"
    save_file({"inputs": torch.randn(n, *shape, generator=generator), "targets": torch.arange(n) % classes}, str(path))
    return path


def job(model: Path, data: Path | None = None, spec: dict | None = None, **analyses) -> AnalysisJob:
    return AnalysisJob(model_path=model, model_sha256="0" * 64, data_path=data, data_sha256="1" * 64 if data else "",
                       loss="cross_entropy", analyses={"lipschitz": spec or {}, **analyses})


MLP = [{"type": "linear", "in_features": 3, "out_features": 10}, {"type": "relu"},
       {"type": "linear", "in_features": 10, "out_features": 8}, {"type": "relu"},
       {"type": "linear", "in_features": 8, "out_features": 4}]


def test_reference_network_without_data():
    report = run_analysis(job(reference_file("random_2-10-30-20-2.pt2"), weight_spectra={}))
    result = report["results"]["lipschitz"]
    assert result["bounds"]["lipsdp_neuron"] == pytest.approx(36.482, abs=1e-3)
    assert result["bounds"]["lipsdp_layer"] == pytest.approx(39.839, abs=1e-3)
    assert result["upper"] == result["bounds"]["lipsdp_neuron"] and result["method"] == "lipsdp_neuron"
    assert result["lower"] == 0.0 and result["chain"]["found"]
    statuses = {d["method"]: d["status"] for d in result["details"]}
    assert statuses == {"naive": "ok", "eclipse_fast": "ok", "lipsdp_neuron": "ok", "lipsdp_layer": "ok",
                        "lower": "not_applicable"}
    assert [layer["name"] for layer in report["results"]["weight_spectra"]["layers"]] == ["0", "2", "4", "6"]


def test_interval_on_a_relu_net_with_data(tmp_path):
    model = write_sequential(tmp_path, "mlp", MLP, [3])
    result = run_analysis(job(model, write_data(tmp_path, (3,), 4)))["results"]["lipschitz"]
    b = result["bounds"]
    assert b["lower"] <= b["lipsdp_neuron"] <= b["lipsdp_layer"] * (1 + 1e-6) <= b["eclipse_fast"] * (1 + 2e-6)
    assert b["eclipse_fast"] <= b["naive"] * (1 + 1e-9)
    assert result["relative_gap"] == pytest.approx((result["upper"] - result["lower"]) / result["upper"])


def test_split_in_pairs_matches_the_published_value():
    spec = {"methods": ["LIPSCHITZ_METHOD_LIPSDP_NEURON"], "split_size": 2}
    result = run_analysis(job(reference_file("random_2-10-30-20-2.pt2"), spec=spec))["results"]["lipschitz"]
    (detail,) = result["details"]
    assert detail["pieces"] == 2 and detail["value"] == pytest.approx(37.668, abs=1e-3)


def test_deep_linear_network_is_exact_and_the_interval_closes(tmp_path):
    layers = [{"type": "linear", "in_features": 4, "out_features": 6}, {"type": "linear", "in_features": 6, "out_features": 5},
              {"type": "linear", "in_features": 5, "out_features": 3}]
    model = write_sequential(tmp_path, "linear", layers, [4], seed=3)
    result = run_analysis(job(model, write_data(tmp_path, (4,), 3)))["results"]["lipschitz"]
    from safetensors.torch import load_file

    w = load_file(str(model))
    exact = float(torch.linalg.matrix_norm(w["2.weight"].double() @ w["1.weight"].double() @ w["0.weight"].double(), ord=2))
    assert result["upper"] == pytest.approx(exact, rel=1e-6) and result["lower"] == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("zeroed", ["0.weight", "2.weight", "4.weight"])
def test_a_layer_of_zero_weights_gives_the_closed_interval_at_zero(tmp_path, zeroed):
    # A dead layer (a broken or fully pruned checkpoint) makes the net constant: every bound is 0,
    # no solver runs (its layer scaling needs non-zero norms), and the analysis does not fail.
    from safetensors.torch import load_file

    model = write_sequential(tmp_path, "dead", MLP, [3])
    state = load_file(str(model))
    state[zeroed].zero_()
    save_sequential(model, {"input_shape": [3], "layers": MLP}, state)
    result = run_analysis(job(model, write_data(tmp_path, (3,), 4)))["results"]["lipschitz"]
    assert result["bounds"] == {m: 0.0 for m in ("naive", "eclipse_fast", "lipsdp_neuron", "lipsdp_layer", "lower")}
    assert (result["lower"], result["upper"], result["relative_gap"]) == (0.0, 0.0, 0.0)


def test_max_pooling_gets_the_naive_bound_and_a_reason_for_the_rest(tmp_path):
    layers = [{"type": "conv2d", "in_channels": 1, "out_channels": 2, "kernel_size": 3}, {"type": "max_pool2d", "kernel_size": 2},
              {"type": "flatten"}, {"type": "linear", "in_features": 2, "out_features": 2}]
    model = write_sequential(tmp_path, "pool", layers, [1, 4, 4])
    result = run_analysis(job(model, write_data(tmp_path, (1, 4, 4), 2)))["results"]["lipschitz"]
    assert not result["chain"]["found"] and "max pooling" in result["note"]
    assert 0 < result["lower"] <= result["upper"] == result["bounds"]["naive"] and result["method"] == "naive"
    statuses = {d["method"]: d["status"] for d in result["details"]}
    assert statuses == {"naive": "ok", "eclipse_fast": "not_applicable", "lipsdp_neuron": "not_applicable",
                        "lipsdp_layer": "not_applicable", "lower": "ok"}
    # no data: the naive bound alone
    assert run_analysis(job(model))["results"]["lipschitz"]["upper"] == result["upper"]


def test_a_network_without_a_sound_upper_bound_gets_the_lower_bound_only(tmp_path):
    gated = export_gated(tmp_path)
    result = run_analysis(job(gated, write_data(tmp_path, (3,), 2)))["results"]["lipschitz"]
    assert not result["chain"]["found"] and "product of two data paths" in result["note"]
    assert result["lower"] > 0 and math.isinf(float(result["upper"])) and result["method"] == ""
    with pytest.raises(InvalidInput, match="product of two data paths"):
        run_analysis(job(gated))


def export_gated(root: Path) -> Path:
    """y = C (relu(A x) ⊙ B x): a product of two data paths, Lipschitz on no unbounded domain."""

    class Gated(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b, self.c = torch.nn.Linear(3, 4), torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.c(torch.relu(self.a(x)) * self.b(x))

    program = torch.export.export(Gated().eval(), (torch.randn(2, 3),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, root / "gated.pt2")
    return root / "gated.pt2"


@pytest.mark.parametrize("spec, message", [
    ({"methods": ["LIPSCHITZ_METHOD_EXACT"]}, "unknown Lipschitz method"),
    ({"split_size": 1}, "split_size 1"),
    ({"time_limit_seconds": -1.0}, "time_limit_seconds"),
    ({"memory_limit_mib": 10}, "memory_limit_mib"),
])
def test_bad_options_are_refused(tmp_path, spec, message):
    with pytest.raises(InvalidInput, match=message):
        run_analysis(job(write_sequential(tmp_path, "mlp", MLP, [3]), spec=spec))


def test_a_solve_over_its_time_cap_reports_what_was_reached(tmp_path):
    layers = [{"type": "linear", "in_features": 16, "out_features": 400}, {"type": "relu"},
              {"type": "linear", "in_features": 400, "out_features": 3}]
    model = write_sequential(tmp_path, "wide", layers, [16])
    with pytest.raises(DeadlineExceeded, match="bounds reached before it: naive .*eclipse_fast"):
        run_analysis(job(model, spec={"time_limit_seconds": 0.5}))
    # and the process still serves: the next request solves
    assert run_analysis(job(reference_file("random_2-10-30-20-2.pt2")))["results"]["lipschitz"]["upper"] > 0


def test_the_server_process_never_imports_cvxpy():
    code = (
        "import sys, json; from pathlib import Path; from curvscope_service.engine import AnalysisJob, run_analysis; "
        f"r = run_analysis(AnalysisJob(model_path=Path({str(reference_file('random_2-10-30-20-2.pt2'))!r}), model_sha256='0'*64, "
        "loss='mse', analyses={'lipschitz': {}})); "
        "print(json.dumps([r['results']['lipschitz']['upper'], 'cvxpy' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, check=True).stdout
    upper, imported = json.loads(out.strip().splitlines()[-1])
    assert upper == pytest.approx(36.482, abs=1e-3) and imported is False


def test_report_goes_through_the_api_message_and_renders(tmp_path):
    from curvscope._table import render_report
    from curvscope.report import message_to_dict
    from curvscope_service.requests import report_document, report_message

    layers = [{"type": "conv2d", "in_channels": 1, "out_channels": 2, "kernel_size": 3}, {"type": "max_pool2d", "kernel_size": 2},
              {"type": "flatten"}, {"type": "linear", "in_features": 2, "out_features": 2}]
    pool = write_sequential(tmp_path, "pool", layers, [1, 4, 4])
    report = message_to_dict(report_message(report_document(run_analysis(job(pool, write_data(tmp_path, (1, 4, 4), 2), weight_spectra={})))))
    lip = report["results"]["lipschitz"]
    assert 0 < lip["lower"] <= lip["upper"] < math.inf and lip["chain"]["found"] is False
    assert report["results"]["weight_spectra"]["layers"][0]["name"] == "0"
    text = render_report(report)
    assert f"Lipschitz constant in [{lip['lower']:.6g}, {lip['upper']:.6g}]" in text and "max pooling" in text
    # no sound upper bound: infinite through the message and the table
    gated = export_gated(tmp_path)
    report = message_to_dict(report_message(report_document(run_analysis(job(gated, write_data(tmp_path, (3,), 2))))))
    lip = report["results"]["lipschitz"]
    assert math.isinf(lip["upper"]) and lip["lower"] > 0
    assert f"Lipschitz constant in [{lip['lower']:.6g}, inf]" in render_report(report)
