"""Graph -> layer chain: unrolled matrices against autograd Jacobians, folded BatchNorm, slopes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from curvscope_service.lipschitz.chain import module_chain
from curvscope_service.lipschitz.graph_bound import bound_graph
from curvscope_service.lipschitz.naive import naive_bound, power_iteration_norm
from curvscope_service.lipschitz.network import activation_slope, extract_network
from curvscope_service.loading import load_model

from conftest import loaded, reference_file, reference_weights


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 4, 2, padding=1), nn.AvgPool2d(2), nn.Flatten(), nn.Tanh(), nn.Linear(4 * 2 * 2, 5),
    )
    model[1].running_mean.uniform_(-1.0, 1.0)
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def exported(module: nn.Module, shape: tuple[int, ...], path) -> object:
    program = torch.export.export(module, (torch.randn(2, *shape),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    return load_model(path)


def test_unrolled_segments_are_the_layers_jacobians(tmp_path):
    model = cnn()
    extraction = extract_network(loaded(model, (2, 6, 6)))
    network = extraction.network
    assert network is not None and network.dense
    assert [a.name for a in network.activations] == ["relu", "tanh"]
    # conv+BN (folded), then conv+pool+flatten, then linear
    parts = [model[0:2], model[3:6], model[7:]]
    shapes = [(2, 6, 6), (3, 3, 3), (16,)]
    for segment, part, shape in zip(network.segments, parts, shapes):
        part = part.double()
        jac = torch.autograd.functional.jacobian(lambda x: part(x.reshape(1, *shape)).reshape(-1),
                                                 torch.randn(math.prod(shape), dtype=torch.float64))
        np.testing.assert_allclose(segment.matrix, jac.numpy(), atol=1e-12)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(network.forward(x), model.double()(x))


def test_exported_graph_gives_the_same_chain(tmp_path):
    model = cnn()
    from_module = extract_network(loaded(model, (2, 6, 6))).network
    from_graph = extract_network(exported(model, (2, 6, 6), tmp_path / "cnn.pt2")).network
    assert len(from_graph.segments) == len(from_module.segments) == 3
    for a, b in zip(from_graph.segments, from_module.segments):
        np.testing.assert_allclose(a.matrix, b.matrix, atol=1e-6)  # the archive holds float32 weights


def test_reference_archive_holds_the_reference_weights():
    network = extract_network(load_model(reference_file("random_2-10-30-20-2.pt2"))).network
    for segment, w in zip(network.segments, reference_weights("random_weights.mat")):
        np.testing.assert_allclose(segment.matrix, w, atol=1e-6)


def test_unrolled_conv_norm_equals_power_iteration_on_the_operator():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).eval()
    segment = extract_network(loaded(model, (3, 6, 6))).network.segments[0]
    exact = np.linalg.norm(segment.matrix, 2)
    assert power_iteration_norm(segment, tol=1e-13, max_iterations=5000) == pytest.approx(exact, rel=1e-6)


def test_large_layers_stay_operators():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 8 * 8, 2)).eval()
    network = extract_network(loaded(model, (1, 8, 8)), max_dense_entries=1000).network
    assert network.segments[0].matrix is None and network.segments[1].matrix is not None and not network.dense


@pytest.mark.parametrize("module, reason", [
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 2)), "max pooling"),
    (nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=1)), "softmax"),
])
def test_non_chains_get_a_reason(module, reason):
    extraction = extract_network(loaded(module, (1, 4, 4) if isinstance(module[0], nn.Conv2d) else (3,)))
    assert extraction.network is None and reason in extraction.reason


def test_residual_graph_gets_a_reason(tmp_path):
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(x + torch.relu(self.a(x)))

    extraction = extract_network(exported(Residual().eval(), (3,), tmp_path / "res.pt2"))
    assert extraction.network is None and "residual" in extraction.reason


def test_a_conv1d_net_is_a_chain_and_the_graph_bound_reads_the_same_affine_maps(tmp_path):
    # Conv1d and 1-d average pooling are affine: the chain verdict and the graph bound agree on it
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(), nn.AvgPool1d(2), nn.Conv1d(3, 2, 2), nn.Tanh(),
                          nn.Flatten(), nn.Linear(4, 2)).eval()
    chain = module_chain(model)
    assert chain.found and "3 linear or convolutional layers" in chain.reason
    network = extract_network(loaded(model, (2, 6))).network
    assert network is not None and network.dense and [a.name for a in network.activations] == ["relu", "tanh"]
    from_graph = extract_network(exported(model, (2, 6), tmp_path / "conv1d.pt2")).network
    assert from_graph is not None and len(from_graph.segments) == len(network.segments) == 3
    for a, b in zip(from_graph.segments, network.segments):
        np.testing.assert_allclose(a.matrix, b.matrix, atol=1e-6)  # the archive holds float32 weights
    assert bound_graph(model, (2, 6)).value == pytest.approx(naive_bound(network).value, rel=1e-9)
    x = torch.randn(4, 2, 6, dtype=torch.float64)
    torch.testing.assert_close(network.forward(x), model.double()(x))


@pytest.mark.parametrize("kind, kwargs, fn", [
    ("relu", {}, torch.relu), ("tanh", {}, torch.tanh), ("sigmoid", {}, torch.sigmoid),
    ("leaky_relu", {"negative_slope": 0.2}, lambda x: nn.functional.leaky_relu(x, 0.2)),
    ("gelu", {}, nn.functional.gelu),
    ("gelu", {"approximate": "tanh"}, lambda x: nn.functional.gelu(x, approximate="tanh")),
])
def test_slopes_are_the_extremes_of_the_derivative(kind, kwargs, fn):
    slope = activation_slope(kind, **kwargs)
    x = torch.linspace(-20, 20, 400_001, dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(fn(x).sum(), x)
    assert slope.alpha <= float(d.min()) and float(d.max()) <= slope.beta
    assert float(d.min()) - slope.alpha < 1e-6 and slope.beta - float(d.max()) < 1e-6
