"""Limits: parameters, samples and analysis wall time, configurable by flag and environment,
listed by GetCapabilities, enforced with a message that says what to do."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from curvscope import Client, CurvscopeError
from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb
from curvscope_service.config import config_from_args
from curvscope_service.in_process import InProcessServer

DIGITS_PARAMETERS = 64 * 32 + 32 + 32 * 10 + 10  # the demo MLP


def test_flags_and_environment(monkeypatch):
    monkeypatch.setenv("CURVSCOPE_MAX_PARAMETERS", "1000")
    monkeypatch.setenv("CURVSCOPE_CONCURRENCY", "2")
    config = config_from_args(["--max-samples", "64", "--max-analysis-seconds", "5"])
    assert config.limits.max_parameters == 1000 and config.limits.max_samples == 64
    assert config.max_analysis_seconds == 5 and config.concurrency == 2
    for bad in (["--concurrency", "0"], ["--max-samples", "-1"], ["--gc-interval", "0"]):
        with pytest.raises(SystemExit):
            config_from_args(bad)


def _server(tmp_path, *flags):
    config = config_from_args(["--store", str(tmp_path / "store"), *flags])
    return InProcessServer(config)


def test_limits_are_listed_and_enforced(tmp_path, digits_files):
    model_path, data_path = digits_files
    with _server(tmp_path, "--max-parameters", str(DIGITS_PARAMETERS - 1), "--max-samples", "100",
                 "--max-analysis-seconds", "2.5", "--concurrency", "3", "--memory-budget", "6GiB") as server, \
            Client(server.target) as client:
        limits = client.capabilities()["limits"]
        assert limits["max_parameters"] == DIGITS_PARAMETERS - 1 and limits["max_samples"] == 100
        assert limits["max_analysis_seconds"] == 2.5 and limits["concurrency_per_device"] == 3
        assert int(limits["memory_budget_bytes"]) == 6 * 2**30
        with pytest.raises(CurvscopeError) as caught:
            client.analyze(model_path, data_path, max_samples=50)
        assert caught.value.code == "RESOURCE_EXHAUSTED"
        assert f"{DIGITS_PARAMETERS} parameters" in caught.value.message and "limit" in caught.value.message
    with _server(tmp_path, "--max-samples", "100") as server, Client(server.target) as client:
        with pytest.raises(CurvscopeError) as caught:
            client.analyze(model_path, data_path)
        assert caught.value.code == "RESOURCE_EXHAUSTED"
        assert "512 samples" in caught.value.message and "--max-samples 100" in caught.value.message
        # The advice works: a subset within the cap is analysed.
        report = client.analyze(model_path, data_path, max_samples=100)
        assert report.to_dict()["data"]["num_samples"] == 100


def test_analysis_time_limit_stops_the_work(tmp_path, digits_files):
    model_path, data_path = digits_files
    big = tmp_path / "big.safetensors"
    data = load_file(str(data_path))
    save_file({"inputs": data["inputs"].repeat(8, 1), "targets": data["targets"].repeat(8)}, str(big))
    with _server(tmp_path, "--max-analysis-seconds", "1") as server, Client(server.target) as client:
        request = pb.AnalyzeRequest(
            model=client.model_ref(model_path), data=client.data_ref(big), loss="cross_entropy",
            options=pb.AnalysisOptions(micro_batch_size=128),
            analyses=[pb.AnalysisSpec(hessian_eigen=pb.HessianEigenSpec(top_k=40, tolerance=1e-9, max_hvps=2000))])
        with pytest.raises(CurvscopeError) as caught:
            client.analyze_request(request, timeout=60)
        assert caught.value.code == "RESOURCE_EXHAUSTED" and "limit of 1 s" in caught.value.message
        # Refused work is not cached: the worker is free and a quick request runs.
        assert client.analyze(model_path, data_path, eigen=1).results.hessian_eigen.largest
