"""The engine's entry point against dense float64 Hessians: every format, per layer, float32/64."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from curvscope_service.engine import AnalysisJob, EngineLimits, run_analysis, validate_job
from curvscope_service.errors import InvalidInput, Unimplemented
from curvscope_service.loading import load_data, load_model, save_sequential
from curvscope_service.losses import get_loss
from dense_reference import dense_hessian

DEVICES = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])

CNN_CONFIG = {
    "input_shape": [1, 6, 6],
    "layers": [
        {"type": "conv2d", "in_channels": 1, "out_channels": 3, "kernel_size": 3},
        {"type": "batchnorm2d", "num_features": 3},
        {"type": "gelu"},
        {"type": "avg_pool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "in_features": 12, "out_features": 4},
    ],
}


def _cnn() -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.GELU(),
                                torch.nn.AvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 4))
    model[1].running_mean.uniform_(-0.5, 0.5)  # eval-mode BatchNorm that is not the identity
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def cnn_files(tmp_path_factory):
    """A BatchNorm CNN (sequential safetensors and .pt2 with a dynamic batch), 40 samples, both losses."""
    root = tmp_path_factory.mktemp("cnn")
    model = _cnn()
    save_sequential(root / "cnn.safetensors", CNN_CONFIG, model.state_dict())
    inputs = torch.randn(40, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    exported = torch.export.export(model, (inputs,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(exported, str(root / "cnn.pt2"))
    static = torch.export.export(model, (inputs[:8],))
    torch.export.save(static, str(root / "cnn-batch8.pt2"))
    save_file({"inputs": inputs, "targets": torch.arange(40) % 4}, str(root / "classes.safetensors"))
    save_file({"inputs": inputs, "targets": torch.randn(40, 4, generator=torch.Generator().manual_seed(2))},
              str(root / "regression.safetensors"))
    return root


def _truth(model_path, data_path, loss, names=None):
    model = load_model(model_path, dtype=torch.float64)
    data = load_data(data_path, dtype=torch.float64)
    return torch.linalg.eigvalsh(dense_hessian(model.module, data.inputs, data.targets, get_loss(loss), names))


def _job(model_path, data_path, loss="cross_entropy", **options) -> AnalysisJob:
    eigen = options.pop("eigen", {"top_k": 3, "bottom_k": 3, "tolerance": 1e-8})
    return AnalysisJob(model_path=model_path, model_sha256="0" * 64, data_path=data_path, loss=loss,
                       analyses={"hessian_eigen": eigen}, **options)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_file", ["cnn.safetensors", "cnn.pt2"])
@pytest.mark.parametrize("loss, data_file", [("cross_entropy", "classes.safetensors"), ("mse", "regression.safetensors")])
def test_extreme_eigenvalues_float64(cnn_files, model_file, loss, data_file, device):
    model_path, data_path = cnn_files / model_file, cnn_files / data_file
    report = run_analysis(_job(model_path, data_path, loss, precision="float64", micro_batch_size=16), device=device)
    eigen = report["results"]["hessian_eigen"]
    truth = _truth(model_path, data_path, loss)
    assert eigen["converged"]
    torch.testing.assert_close(torch.tensor(eigen["largest"], dtype=torch.float64), truth.flip(0)[:3], rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.tensor(eigen["smallest"], dtype=torch.float64), truth[:3], rtol=1e-6, atol=0)
    assert report["loss"]["name"] == loss and report["device"] == device and report["precision"] == "float64"


def test_float32_within_1e3_and_per_layer_blocks(cnn_files):
    model_path, data_path = cnn_files / "cnn.safetensors", cnn_files / "classes.safetensors"
    report = run_analysis(_job(model_path, data_path, eigen={"top_k": 2, "bottom_k": 1}, per_layer=True))
    truth = _truth(model_path, data_path, "cross_entropy")
    eigen = report["results"]["hessian_eigen"]
    torch.testing.assert_close(torch.tensor(eigen["largest"], dtype=torch.float64), truth.flip(0)[:2], rtol=1e-3, atol=0)
    blocks = load_model(model_path).parameter_blocks
    assert set(report["per_layer"]) == set(blocks) == {"0", "1", "5"}
    for block, names in blocks.items():
        block_truth = _truth(model_path, data_path, "cross_entropy", names)
        largest = report["per_layer"][block]["hessian_eigen"]["largest"]
        torch.testing.assert_close(torch.tensor(largest, dtype=torch.float64), block_truth.flip(0)[:2], rtol=1e-3, atol=0)


def test_static_batch_export_is_fed_in_chunks_of_its_batch(cnn_files):
    report = run_analysis(_job(cnn_files / "cnn-batch8.pt2", cnn_files / "classes.safetensors", precision="float64"))
    truth = _truth(cnn_files / "cnn.pt2", cnn_files / "classes.safetensors", "cross_entropy")
    torch.testing.assert_close(torch.tensor(report["results"]["hessian_eigen"]["largest"], dtype=torch.float64),
                               truth.flip(0)[:3], rtol=1e-6, atol=0)
    with pytest.raises(InvalidInput, match="fixed batch size of 8"):
        run_analysis(_job(cnn_files / "cnn-batch8.pt2", cnn_files / "classes.safetensors", max_samples=20))


def test_max_samples_subsamples_reproducibly(cnn_files):
    job = _job(cnn_files / "cnn.safetensors", cnn_files / "classes.safetensors", eigen={"top_k": 2}, max_samples=24, seed=5)
    first, second = run_analysis(job), run_analysis(job)
    assert first["data"]["num_samples"] == 24
    assert first["results"]["hessian_eigen"]["largest"] == second["results"]["hessian_eigen"]["largest"]
    other = run_analysis(_job(cnn_files / "cnn.safetensors", cnn_files / "classes.safetensors", eigen={"top_k": 2},
                              max_samples=24, seed=6))
    assert other["results"]["hessian_eigen"]["largest"] != first["results"]["hessian_eigen"]["largest"]


@pytest.mark.parametrize("change, error, words", [
    ({"analyses": {"hessian_inverse": {}}}, Unimplemented, "hessian_inverse"),
    ({"analyses": {}}, InvalidInput, "no analysis"),
    ({"curvature": "fisher", "analyses": {"non_uniformity": {}}}, Unimplemented, "fisher"),
    ({"precision": "float16"}, InvalidInput, "float16"),
    ({"loss": "hinge"}, InvalidInput, "hinge"),
    ({"data_path": None}, InvalidInput, "data"),
    ({"analyses": {"hessian_eigen": {"top_k": 500}}}, InvalidInput, "at most"),
    ({"analyses": {"hessian_eigen": {"tolerance": 2.0}}}, InvalidInput, "tolerance"),
    ({"analyses": {"hessian_eigen": {"max_hvps": 10**6}}}, InvalidInput, "limit"),
])
def test_refused_before_queueing(cnn_files, change, error, words):
    job = _job(cnn_files / "cnn.safetensors", cnn_files / "classes.safetensors")
    for key, value in change.items():
        setattr(job, key, value)
    with pytest.raises(error, match=words):
        validate_job(job, EngineLimits())
