"""GGN, Fisher and empirical Fisher operators against dense references built from Jacobians."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from curvscope_service.curvature.operators.fisher import EmpiricalFisherOperator, FisherOperator
from curvscope_service.curvature.operators.ggn import GGNOperator
from curvscope_service.errors import InvalidInput


def flat_function(model, names=None):
    """(theta0, f(theta) -> outputs for given inputs) over the selected parameters."""
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]

    def outputs(theta, inputs):
        values = {k: p.detach() for k, p in params.items()}
        values.update({k: t.reshape(s) for k, t, s in zip(names, theta.split(sizes), shapes)})
        return functional_call(model, values, (inputs,))

    return torch.cat([params[k].detach().reshape(-1) for k in names]), outputs


def dense_ggn(case, names=None):
    """J^T H_loss J with J = d outputs / d theta (jacrev) and H_loss the loss' Hessian in the outputs."""
    theta, outputs = flat_function(case.model, names)
    out = outputs(theta, case.inputs)
    J = jacrev(lambda t: outputs(t, case.inputs).reshape(-1))(theta)
    H_loss = hessian(lambda o: case.loss_fn(o.reshape(out.shape), case.targets))(out.reshape(-1))
    return J.T @ H_loss @ J


def dense_empirical_fisher(case):
    """(1/n) sum_i g_i g_i^T from the per-sample gradients (rows of a Jacobian of per-sample losses)."""
    theta, outputs = flat_function(case.model)

    def losses(t):
        return torch.stack([case.loss_fn(outputs(t, case.inputs[i:i + 1]), case.targets[i:i + 1])
                            for i in range(case.inputs.shape[0])])

    G = jacrev(losses)(theta)
    return G.T @ G / G.shape[0]


def as_matrix(operator) -> torch.Tensor:
    return operator.matmat(torch.eye(operator.dim, dtype=operator.dtype))


def test_ggn_matches_the_dense_reference_and_is_psd(case, rel):
    operator = GGNOperator(case.model, case.inputs, case.targets, case.loss_fn, micro_batch_size=3)
    G = as_matrix(operator)
    assert rel(G, dense_ggn(case)) < 1e-10
    assert torch.linalg.eigvalsh(G).min() >= -1e-12 * G.norm()
    v = torch.randn(operator.dim, dtype=torch.float64)
    assert rel(operator.matvec(v), G @ v) < 1e-12
    assert operator.products == operator.dim + 1


def test_ggn_of_a_block(cnn_case, rel):
    names = ["4.weight", "4.bias"]
    operator = GGNOperator(cnn_case.model, cnn_case.inputs, cnn_case.targets, cnn_case.loss_fn, param_names=names)
    assert rel(as_matrix(operator), dense_ggn(cnn_case, names)) < 1e-10


def test_ggn_equals_the_hessian_of_a_linear_model_with_mse(hessian_of, rel):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4)).double()
    inputs, targets = torch.randn(12, 2, 3, dtype=torch.float64), torch.randn(12, 4, dtype=torch.float64)

    def mse(o, t):
        return ((o - t) ** 2).mean()

    operator = GGNOperator(model, inputs, targets, mse, micro_batch_size=5)
    assert rel(as_matrix(operator), hessian_of(model, inputs, targets, mse)) < 1e-12


def test_fisher_expectation_is_the_ggn(case, rel):
    # E over labels drawn from the model of r r^T is the loss' Hessian in the outputs, so the
    # Fisher's mean over many sampled labels tends to the GGN (Monte-Carlo error ~ 1/sqrt(S)).
    loss = "cross_entropy" if case.loss_fn is nn.functional.cross_entropy else "mse"
    G = as_matrix(GGNOperator(case.model, case.inputs, case.targets, case.loss_fn))
    few = as_matrix(FisherOperator(case.model, case.inputs, case.targets, case.loss_fn, loss=loss, mc_samples=20, seed=1))
    many = as_matrix(FisherOperator(case.model, case.inputs, case.targets, case.loss_fn, loss=loss, mc_samples=2000,
                                    seed=1, micro_batch_size=4))
    assert rel(many, G) < 0.05
    assert rel(many, G) < rel(few, G) / 3
    assert torch.linalg.eigvalsh(few).min() >= -1e-12 * few.norm()


def test_fisher_is_seeded(cnn_case):
    def fisher(seed):
        return as_matrix(FisherOperator(cnn_case.model, cnn_case.inputs, cnn_case.targets, cnn_case.loss_fn,
                                        loss="cross_entropy", seed=seed))

    assert torch.equal(fisher(4), fisher(4))
    assert not torch.allclose(fisher(4), fisher(5))


def test_empirical_fisher_matches_per_sample_gradients(case, rel):
    operator = EmpiricalFisherOperator(case.model, case.inputs, case.targets, case.loss_fn, micro_batch_size=4)
    assert rel(as_matrix(operator), dense_empirical_fisher(case)) < 1e-10


def test_loss_and_gradient(cnn_case, rel):
    operator = GGNOperator(cnn_case.model, cnn_case.inputs, cnn_case.targets, cnn_case.loss_fn, micro_batch_size=3)
    theta, outputs = flat_function(cnn_case.model)
    value = cnn_case.loss_fn(outputs(theta, cnn_case.inputs), cnn_case.targets)
    assert operator.loss() == pytest.approx(value.item(), rel=1e-12)
    gradient = torch.func.grad(lambda t: cnn_case.loss_fn(outputs(t, cnn_case.inputs), cnn_case.targets))(theta)
    assert rel(operator.gradient(), gradient) < 1e-12


def test_float32(cnn_case, rel):
    case32 = cnn_case.to(torch.float32)
    operator = GGNOperator(case32.model, case32.inputs, case32.targets, case32.loss_fn)
    assert operator.dtype == torch.float32
    assert rel(as_matrix(operator).double(), dense_ggn(cnn_case)) < 1e-5


def test_bad_input(cnn_case):
    args = (cnn_case.model, cnn_case.inputs, cnn_case.targets, cnn_case.loss_fn)
    with pytest.raises(InvalidInput, match="unknown parameter"):
        GGNOperator(*args, param_names=["nope"])
    with pytest.raises(InvalidInput, match="batch size"):
        GGNOperator(cnn_case.model, cnn_case.inputs, cnn_case.targets[:3], cnn_case.loss_fn)
    with pytest.raises(InvalidInput, match="likelihood"):
        FisherOperator(*args, loss="hinge")
    with pytest.raises(InvalidInput, match="mc_samples"):
        FisherOperator(*args, loss="cross_entropy", mc_samples=0)
    operator = GGNOperator(*args)
    with pytest.raises(ValueError, match="dim"):
        operator.matvec(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="float64"):
        operator.matmat(torch.zeros(operator.dim, 2, dtype=torch.float32))


def test_check_stops_the_products(cnn_case):
    calls = []

    def check():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("cancelled")

    operator = GGNOperator(cnn_case.model, cnn_case.inputs, cnn_case.targets, cnn_case.loss_fn,
                           micro_batch_size=2, check=check)
    with pytest.raises(RuntimeError, match="cancelled"):
        operator.matvec(torch.ones(operator.dim, dtype=torch.float64))
