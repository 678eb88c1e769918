"""The memory plan: its ceiling, the choices it makes under a small one, its refusals, and the
measured peak against the plan on a mid-size model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from curvscope_service import memory_plan
from curvscope_service.engine import AnalysisJob, EngineLimits, run_analysis
from curvscope_service.errors import ResourceExhausted
from curvscope_service.loading import load_data, load_model, save_sequential
from curvscope_service.losses import get_loss
from curvscope_service.memory_plan import ProductCost, Shape, resolve_budget, trace_bytes
from dense_reference import dense_hessian

CONFIG = {"input_shape": [8], "layers": [
    {"type": "linear", "in_features": 8, "out_features": 12}, {"type": "tanh"},
    {"type": "linear", "in_features": 12, "out_features": 3}]}
# A product's cost as calibrate would measure it, fixed so the thresholds below are exact.
COST = ProductCost(base=200_000, per_vector=1_000_000)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    save_sequential(root / "mlp.safetensors", CONFIG, model.state_dict())
    inputs = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    save_file({"inputs": inputs, "targets": torch.arange(32) % 3}, str(root / "classes.safetensors"))
    return root


@pytest.fixture
def fixed_cost(monkeypatch):
    monkeypatch.setattr(memory_plan, "calibrate", lambda operator, meter: COST)


def job(files, analyses, **options) -> AnalysisJob:
    return AnalysisJob(model_path=files / "mlp.safetensors", model_sha256="0" * 64,
                       data_path=files / "classes.safetensors", loss="cross_entropy", analyses=analyses,
                       precision="float64", **options)


def shape(files) -> Shape:
    model = load_model(files / "mlp.safetensors", dtype=torch.float64).module
    data = load_data(files / "classes.safetensors", dtype=torch.float64)
    resident = memory_plan.resident_bytes(model, [*data.inputs, data.targets])
    return Shape(dim=sum(p.numel() for p in model.parameters()), itemsize=8, resident=resident, product=COST)


def truth(files) -> float:
    model = load_model(files / "mlp.safetensors", dtype=torch.float64).module
    data = load_data(files / "classes.safetensors", dtype=torch.float64)
    return dense_hessian(model, data.inputs[0], data.targets, get_loss("cross_entropy")).trace().item()


def test_a_small_ceiling_picks_smaller_blocks_and_the_trace_stays_right(files, fixed_cost):
    budget = trace_bytes("xtrace", 100, 2, False, shape(files))
    report = run_analysis(job(files, {"hessian_trace": {}}, memory_budget_bytes=budget))
    run, trace = report["run"], report["results"]["hessian_trace"]
    assert run["choices"]["hessian_trace.block_size"] == "2"
    assert run["memory_budget_bytes"] == budget and run["memory_budget_source"] == "request"
    assert run["planned_peak_bytes"] == budget
    # The whole budget, two probes per product, and the dense trace within 3 standard errors.
    assert trace["hvps"] == 100 and trace["stderr"] > 0
    assert abs(trace["estimate"] - truth(files)) <= 3 * trace["stderr"]
    unconstrained = run_analysis(job(files, {"hessian_trace": {}}))
    assert unconstrained["run"]["choices"]["hessian_trace.block_size"] == "8"
    assert trace["estimate"] == pytest.approx(unconstrained["results"]["hessian_trace"]["estimate"], rel=1e-9)


def test_a_ceiling_too_small_for_the_probes_is_refused_with_what_fits(files, fixed_cost):
    budget = trace_bytes("xtrace", 100, 1, False, shape(files)) - 1
    with pytest.raises(ResourceExhausted) as refused:
        run_analysis(job(files, {"hessian_trace": {}}, memory_budget_bytes=budget))
    message = str(refused.value)
    assert "XTrace with 100 products (50 probes) needs" in message and "--memory-budget" in message
    fitting = int(message.split("set max_hvps=")[1].split()[0])
    assert 2 <= fitting < 100
    # What the message names runs under the same ceiling, and is still right.
    report = run_analysis(job(files, {"hessian_trace": {"max_hvps": fitting}}, memory_budget_bytes=budget))
    trace = report["results"]["hessian_trace"]
    assert trace["hvps"] == fitting and abs(trace["estimate"] - truth(files)) <= 3 * trace["stderr"]


def test_slq_runs_its_probes_in_groups_that_fit_with_the_same_rules(files, fixed_cost):
    spec = {"lanczos_steps": 12, "num_probes": 6}
    whole = run_analysis(job(files, {"hessian_density": spec}))
    assert whole["run"]["choices"]["hessian_density.probe_group"] == "6"
    budget = memory_plan.density_bytes(12, 2, 2, shape(files))
    grouped = run_analysis(job(files, {"hessian_density": spec}, memory_budget_bytes=budget))
    assert grouped["run"]["choices"]["hessian_density.probe_group"] == "2"
    a, b = whole["results"]["hessian_density"], grouped["results"]["hessian_density"]
    assert b["hvps"] == a["hvps"] == 72
    torch.testing.assert_close(torch.tensor(b["nodes"]), torch.tensor(a["nodes"]), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.tensor(b["weights"]), torch.tensor(a["weights"]), rtol=1e-9, atol=1e-12)
    with pytest.raises(ResourceExhausted, match=r"SLQ with 12 steps needs .* set lanczos_steps=\d+"):
        run_analysis(job(files, {"hessian_density": spec},
                         memory_budget_bytes=memory_plan.density_bytes(12, 1, 1, shape(files)) - 1))


def test_the_ceiling_and_where_it_comes_from():
    free, source = memory_plan.free_memory("cpu")
    assert free > 0 and source == "machine"
    measured = resolve_budget("cpu", 1000)
    assert measured.source == "machine" and 0 < measured.bytes <= free + 1000
    # The server's --memory-budget overrides what was measured (up or down); a request only lowers it.
    assert resolve_budget("cpu", 0, server_bytes=10**15) == memory_plan.Budget(10**15, "--memory-budget")
    assert resolve_budget("cpu", 0, server_bytes=10**9, request_bytes=10**10).bytes == 10**9
    assert resolve_budget("cpu", 0, server_bytes=10**9, request_bytes=10**8) == memory_plan.Budget(10**8, "request")


def test_the_server_limit_is_the_engine_ceiling(files, fixed_cost):
    limits = replace(EngineLimits(), memory_budget_bytes=trace_bytes("xtrace", 100, 4, False, shape(files)))
    report = run_analysis(job(files, {"hessian_trace": {}}), limits=limits)
    assert report["run"]["memory_budget_source"] == "--memory-budget"
    assert report["run"]["choices"]["hessian_trace.block_size"] == "4"


MID_SIZE = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from safetensors.torch import save_file
    from curvscope_service import memory_plan
    from curvscope_service.engine import AnalysisJob, run_analysis
    from curvscope_service.loading import save_sequential
    memory_plan.BATCHING_GAIN = float("inf")  # one product at a time, whatever a timing says
    root = Path(sys.argv[1])
    config = {"input_shape": [384], "layers": [
        {"type": "linear", "in_features": 384, "out_features": 768}, {"type": "tanh"},
        {"type": "linear", "in_features": 768, "out_features": 768}, {"type": "tanh"},
        {"type": "linear", "in_features": 768, "out_features": 10}]}
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(384, 768), torch.nn.Tanh(), torch.nn.Linear(768, 768),
                                torch.nn.Tanh(), torch.nn.Linear(768, 10))
    save_sequential(root / "mlp.safetensors", config, model.state_dict())
    save_file({"inputs": torch.randn(64, 384), "targets": torch.arange(64) % 10}, str(root / "data.safetensors"))
    job = AnalysisJob(model_path=root / "mlp.safetensors", model_sha256="0" * 64,
                      data_path=root / "data.safetensors", loss="cross_entropy",
                      analyses={"hessian_trace": {"max_hvps": 40}, "hessian_density": {"lanczos_steps": 12, "num_probes": 4}})
    print(json.dumps(run_analysis(job)["run"]))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU peak is read from /proc")
def test_the_measured_peak_is_within_the_plan_on_a_mid_size_model(tmp_path):
    """0.9M float32 parameters, 64 samples: XTrace's Q (20 probes) with its products and SLQ's
    bases (4 x 13 vectors) are hundreds of MB, well above the process' noise. In a fresh
    process, so the peak is this run's; products one at a time (the plan's choice where
    batching is not faster; with 8-wide products the plan measured 1.5x conservative here, as
    the 3-wide calibration product overstates the per-vector cost). Bound: measured in
    [0.75, 1.15] x planned (the target is 10 %; measured here 1.05 for the trace, 1.04 for the
    density)."""
    done = subprocess.run([sys.executable, "-c", MID_SIZE, str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    for entry in run["analyses"]:
        ratio = entry["measured_peak_bytes"] / entry["planned_peak_bytes"]
        assert entry["planned_peak_bytes"] > 100e6, entry
        assert 0.75 <= ratio <= 1.15, entry


@pytest.mark.parametrize("speedup, width", [(1.0, 1), (memory_plan.BATCHING_GAIN, 8), (3.0, 8)])
def test_products_are_batched_only_where_calibration_found_it_faster(files, monkeypatch, speedup, width):
    """The trace's block stays 8 either way; its products go through the operator 8 at a time
    only when the 3-wide calibration product was BATCHING_GAIN faster per vector, and the
    estimate is the same to rounding."""
    monkeypatch.setattr(memory_plan, "calibrate", lambda operator, meter: replace(COST, speedup=speedup))
    report = run_analysis(job(files, {"hessian_trace": {}}))
    choices = report["run"]["choices"]
    assert choices["hessian_trace.block_size"] == "8" and choices["hessian_trace.product_width"] == str(width)
    monkeypatch.setattr(memory_plan, "calibrate", lambda operator, meter: COST)
    single = run_analysis(job(files, {"hessian_trace": {}}))["results"]["hessian_trace"]
    assert report["results"]["hessian_trace"]["estimate"] == pytest.approx(single["estimate"], rel=1e-12)
    assert report["results"]["hessian_trace"]["hvps"] == single["hvps"] == 100
