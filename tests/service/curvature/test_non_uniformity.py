"""Non-uniformity and SGD stability against dense float64 per-sample Hessians and closed forms."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from curvscope_service.curvature.measures.non_uniformity import compute_non_uniformity, sgd_noise_factor
from curvscope_service.curvature.operators import per_sample
from curvscope_service.curvature.operators.hessian import HessianOperator
from curvscope_service.curvature.operators.per_sample import PerSampleGaussNewton, PerSampleHessians
from curvscope_service.errors import InvalidInput
from dense_reference import dense_hessian



def small_mlp(loss: str, n: int = 8) -> SimpleNamespace:
    """A tanh MLP (6-5-3) in float64 with n samples, for checks that build their own data."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    inputs = torch.randn(n, 6, dtype=torch.float64)
    if loss == "mse":
        return SimpleNamespace(model=model, inputs=inputs, targets=torch.randn(n, 3, dtype=torch.float64),
                               loss_fn=lambda o, t: ((o - t) ** 2).mean())
    return SimpleNamespace(model=model, inputs=inputs, targets=torch.randint(0, 3, (n,)),
                           loss_fn=nn.functional.cross_entropy)


def exact_operator(case, micro_batch_size=4):
    hessian = HessianOperator(case.model, case.inputs, case.targets, case.loss_fn)
    return PerSampleHessians(case.model, case.inputs, case.targets, case.loss_fn, hessian=hessian,
                             micro_batch_size=micro_batch_size)


def dense_sigma(per_sample: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, Sigma) from explicit per-sample matrices: H = mean H_i, Sigma = mean H_i^2 - H^2."""
    stack = torch.stack(per_sample)
    h = stack.mean(0)
    return h, (stack @ stack).mean(0) - h @ h


def per_sample_hessians(case) -> list[torch.Tensor]:
    return [dense_hessian(case.model, case.inputs[i:i + 1], case.targets[i:i + 1], case.loss_fn)
            for i in range(case.inputs.shape[0])]


def per_sample_gauss_newton(case) -> list[torch.Tensor]:
    """J_i^T L_i J_i with J_i and L_i from torch.autograd.functional, independently of torch.func."""
    names = [k for k, _ in case.model.named_parameters()]
    params = dict(case.model.named_parameters())
    sizes = [params[k].numel() for k in names]
    flat = torch.cat([params[k].detach().reshape(-1) for k in names])

    def output(theta, x):
        values = {k: t.reshape(params[k].shape) for k, t in zip(names, theta.split(sizes))}
        return torch.func.functional_call(case.model, values, (x,)).reshape(-1)

    blocks = []
    for i in range(case.inputs.shape[0]):
        x, t = case.inputs[i:i + 1], case.targets[i:i + 1]
        jacobian = torch.autograd.functional.jacobian(lambda theta: output(theta, x), flat)
        o = output(flat, x).detach()
        curvature = torch.autograd.functional.hessian(lambda z: case.loss_fn(z.reshape(1, -1), t), o)
        blocks.append(jacobian.T @ curvature @ jacobian)
    return blocks


def top(matrix: torch.Tensor) -> float:
    return torch.linalg.eigvalsh(matrix)[-1].item()


def stability_matrix(h, sigma, eta, n, b):
    """Wu, Ma & E's operator with their factor written out: (n - B) / (B (n - 1))."""
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    return (eye - eta * h) @ (eye - eta * h) + eta**2 * (n - b) / (b * (n - 1)) * sigma


@pytest.mark.parametrize("n, b", [(6, 1), (6, 2), (6, 5), (6, 6), (7, 3)])
def test_noise_factor_is_the_variance_of_a_batch_drawn_without_replacement(n, b):
    # The factor's meaning, by enumeration: over every batch of B distinct samples, the mean of
    # (H_B - H)^2, H_B the batch's mean Hessian, is factor x Sigma.
    generator = torch.Generator().manual_seed(n * 10 + b)
    per_sample = [(lambda m: m + m.T)(torch.randn(4, 4, dtype=torch.float64, generator=generator)) for _ in range(n)]
    h, sigma = dense_sigma(per_sample)
    batches = list(itertools.combinations(range(n), b))
    spread = sum(((sum(per_sample[i] for i in batch) / b - h) @ (sum(per_sample[i] for i in batch) / b - h))
                 for batch in batches) / len(batches)
    assert torch.allclose(spread, sgd_noise_factor(n, b) * sigma, rtol=1e-10, atol=1e-12)
    assert sgd_noise_factor(n, b) == pytest.approx((n - b) / (b * (n - 1)), rel=1e-15)


# Every way a product can be computed: per-sample gradient graphs kept (double backward or
# linearised), rebuilt per product; Gauss-Newton forward graphs kept (linearised or, where tracing
# fails, a fresh jvp) or rebuilt.
PATHS = ["exact-kept", "exact-linearised", "exact-rebuilt", "gn-kept", "gn-untraced", "gn-rebuilt"]


def path_operator(case, path, monkeypatch):
    if path.startswith("exact"):
        hessian = HessianOperator(case.model, case.inputs, case.targets, case.loss_fn)
        options = {"exact-kept": {"linearise": False}, "exact-linearised": {"linearise": True},
                   "exact-rebuilt": {"retain_budget_elements": 0}}[path]
        operator = PerSampleHessians(case.model, case.inputs, case.targets, case.loss_fn, hessian=hessian,
                                     micro_batch_size=4, **options)
        assert operator.retained == (path != "exact-rebuilt")
        assert operator.linearise == (path == "exact-linearised")
        return operator
    if path == "gn-untraced":
        def refuse(*args, **kwargs):
            raise RuntimeError("cannot trace")
        monkeypatch.setattr(per_sample, "linearize", refuse)
    options = {"retain_max_samples": 0} if path == "gn-rebuilt" else {}
    operator = PerSampleGaussNewton(case.model, case.inputs, case.targets, case.loss_fn, micro_batch_size=4,
                                    **options)
    if path == "gn-rebuilt":
        assert operator._retained is None
    else:
        assert all((push is None) == (path == "gn-untraced") for *_, push in operator._retained)
    return operator


@pytest.mark.parametrize("path", PATHS)
def test_sigma_products_match_dense(case, path, monkeypatch):
    operator = path_operator(case, path, monkeypatch)
    h, sigma = dense_sigma(per_sample_hessians(case) if path.startswith("exact") else per_sample_gauss_newton(case))
    generator = torch.Generator().manual_seed(3)
    # Several products through the same kept graphs: none may be consumed by the one before.
    for _ in range(3):
        v = torch.randn(operator.dim, dtype=torch.float64, generator=generator)
        cv, sv, ccv = operator.sigma_parts(v, square=True)
        assert torch.allclose(cv, h @ v, rtol=1e-9, atol=1e-11)
        assert torch.allclose(sv, sigma @ v, rtol=1e-9, atol=1e-11)
        assert torch.allclose(ccv, h @ (h @ v), rtol=1e-9, atol=1e-11)
        assert torch.allclose(operator.sigma_parts(v)[1], sv, rtol=1e-12, atol=1e-14)
    assert torch.allclose(operator.matvec(v), h @ v, rtol=1e-9, atol=1e-11)
    assert operator.products == 6


@pytest.mark.parametrize("method", ["exact", "gauss_newton"])
def test_non_uniformity_and_stability_eigenvalue_within_1e_3(case, method):
    if method == "exact":
        operator = exact_operator(case)
        h, sigma = dense_sigma(per_sample_hessians(case))
    else:
        operator = PerSampleGaussNewton(case.model, case.inputs, case.targets, case.loss_fn)
        h, sigma = dense_sigma(per_sample_gauss_newton(case))
    n, eta, b = case.inputs.shape[0], 0.5 / top(h), 3
    result = compute_non_uniformity(operator, learning_rate=eta, batch_size=b, tol=1e-6)
    assert result["converged"] and result["stability_converged"]
    assert result["method"] == method
    # Residuals <= 1e-6 |theta|: every eigenvalue within 1e-6 relative (Bauer-Fike), s within 5e-7.
    assert result["value"] == pytest.approx(math.sqrt(top(sigma)), rel=1e-6)
    assert result["sharpness"] == pytest.approx(top(h), rel=1e-6)
    assert result["stability_eigenvalue"] == pytest.approx(top(stability_matrix(h, sigma, eta, n, b)), rel=1e-6)


@pytest.fixture(scope="module")
def regression():
    """Least squares y = w^T x: f_i = (w^T x_i - y_i)^2, so H_i = 2 x_i x_i^T exactly (and G_i = H_i)."""
    torch.manual_seed(5)
    n, d = 12, 4
    model = nn.Linear(d, 1, bias=False).double()
    # Unequal feature scales make the samples' curvatures differ (a non-uniform minimum).
    inputs = torch.randn(n, d, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    targets = torch.randn(n, 1, dtype=torch.float64)
    loss_fn = lambda o, t: ((o - t) ** 2).mean()  # noqa: E731
    hessians = [2 * torch.outer(x, x) for x in inputs]
    h, sigma = dense_sigma(hessians)
    return model, inputs, targets, loss_fn, h, sigma


def regression_result(regression, method, **kwargs):
    model, inputs, targets, loss_fn, *_ = regression
    if method == "exact":
        operator = PerSampleHessians(model, inputs, targets, loss_fn,
                                     hessian=HessianOperator(model, inputs, targets, loss_fn))
    else:
        operator = PerSampleGaussNewton(model, inputs, targets, loss_fn)
    return compute_non_uniformity(operator, tol=1e-8, **kwargs)


@pytest.mark.parametrize("method", ["exact", "gauss_newton"])
def test_linear_regression_closed_form(regression, method):
    *_, h, sigma = regression
    result = regression_result(regression, method, learning_rate=0.1, batch_size=4)
    assert result["sharpness"] == pytest.approx(top(h), rel=1e-6)
    assert result["value"] == pytest.approx(math.sqrt(top(sigma)), rel=1e-6)
    assert result["stability_eigenvalue"] == pytest.approx(top(stability_matrix(h, sigma, 0.1, 12, 4)), rel=1e-6)


def threshold(predicate, low: float, high: float) -> float:
    """The learning rate where predicate turns False, by bisection (predicate(low) is True)."""
    for _ in range(80):
        mid = (low + high) / 2
        low, high = (mid, high) if predicate(mid) else (low, mid)
    return low


@pytest.mark.parametrize("batch_size", [1, 4, 12])
def test_sgd_verdict_flips_at_the_theoretical_learning_rate(regression, batch_size):
    *_, h, sigma = regression
    n = 12
    critical = threshold(lambda eta: top(stability_matrix(h, sigma, eta, n, batch_size)) <= 1, 1e-6, 10.0)
    if batch_size == n:  # full batch: plain GD, the threshold is 2 / a
        assert critical == pytest.approx(2 / top(h), rel=1e-9)
    below = regression_result(regression, "exact", learning_rate=0.99 * critical, batch_size=batch_size)
    above = regression_result(regression, "exact", learning_rate=1.01 * critical, batch_size=batch_size)
    assert below["sgd_stable"] and not above["sgd_stable"]
    assert below["necessary_conditions_met"]


def test_necessary_conditions_flip_at_their_bounds(regression):
    *_, h, sigma = regression
    n, b = 12, 2
    a, s = top(h), math.sqrt(top(sigma))
    # The non-uniformity bound sqrt(B (n - 1) / (n - B)) / eta binds before 2 / a here.
    eta_s = math.sqrt(b * (n - 1) / (n - b)) / s
    assert eta_s < 2 / a
    inside = regression_result(regression, "exact", learning_rate=0.99 * eta_s, batch_size=b)
    outside = regression_result(regression, "exact", learning_rate=1.01 * eta_s, batch_size=b)
    assert inside["necessary_conditions_met"] and not outside["necessary_conditions_met"]
    assert outside["non_uniformity_bound"] == pytest.approx(eta_s / (1.01 * eta_s) * s, rel=1e-9)
    # The sufficient condition cannot hold where a necessary one fails.
    assert not outside["sgd_stable"]


def test_gauss_newton_is_exact_at_an_interpolating_minimum():
    """mse with targets = the model's outputs: zero residuals, so G_i = H_i."""
    case = small_mlp("mse")
    with torch.no_grad():
        case.targets = case.model(case.inputs)
    exact = compute_non_uniformity(exact_operator(case), tol=1e-8)
    gauss_newton = compute_non_uniformity(
        PerSampleGaussNewton(case.model, case.inputs, case.targets, case.loss_fn), tol=1e-8)
    assert gauss_newton["value"] == pytest.approx(exact["value"], rel=1e-6)
    assert gauss_newton["sharpness"] == pytest.approx(exact["sharpness"], rel=1e-6)


def test_gauss_newton_differs_away_from_interpolation():
    case = small_mlp("mse")
    exact = compute_non_uniformity(exact_operator(case), tol=1e-8)
    gauss_newton = compute_non_uniformity(
        PerSampleGaussNewton(case.model, case.inputs, case.targets, case.loss_fn), tol=1e-8)
    assert abs(gauss_newton["value"] - exact["value"]) > 1e-4 * exact["value"]


def test_block_restricts_to_its_parameters():
    case = small_mlp("cross_entropy")
    names = ["2.weight", "2.bias"]
    hessian = HessianOperator(case.model, case.inputs, case.targets, case.loss_fn, param_names=names)
    operator = PerSampleHessians(case.model, case.inputs, case.targets, case.loss_fn, hessian=hessian,
                                 param_names=names)
    blocks = [dense_hessian(case.model, case.inputs[i:i + 1], case.targets[i:i + 1], case.loss_fn, names)
              for i in range(case.inputs.shape[0])]
    _, sigma = dense_sigma(blocks)
    result = compute_non_uniformity(operator, tol=1e-6)
    assert result["value"] == pytest.approx(math.sqrt(top(sigma)), rel=1e-6)


def test_bad_input_is_refused(regression):
    with pytest.raises(InvalidInput, match="batch_size"):
        regression_result(regression, "exact", learning_rate=0.1, batch_size=13)
    with pytest.raises(InvalidInput, match="learning_rate"):
        regression_result(regression, "exact", learning_rate=-1.0, batch_size=2)
    model, inputs, targets, loss_fn, *_ = regression
    with pytest.raises(InvalidInput, match="at least 2 samples"):
        PerSampleGaussNewton(model, inputs[:1], targets[:1], loss_fn)


def test_progress_and_cancellation(regression):
    model, inputs, targets, loss_fn, *_ = regression
    events = []
    operator = PerSampleGaussNewton(model, inputs, targets, loss_fn)
    compute_non_uniformity(operator, learning_rate=0.1, batch_size=2,
                           progress=lambda step, total, estimate: events.append((step, total)))
    assert events and all(step <= total for step, total in events)
    assert [step for step, _ in events] == sorted(step for step, _ in events)

    class Stop(Exception):
        pass

    calls = []

    def check():
        calls.append(1)
        if len(calls) > 3:
            raise Stop

    hessian = HessianOperator(model, inputs, targets, loss_fn, check=check)
    operator = PerSampleHessians(model, inputs, targets, loss_fn, hessian=hessian, check=check)
    with pytest.raises(Stop):
        compute_non_uniformity(operator)


@pytest.fixture(scope="module")
def forty_samples():
    """The 6-5-3 MLP on 40 samples with every per-sample Hessian, for subsampling."""
    case = small_mlp("cross_entropy", n=40)
    return case, per_sample_hessians(case)


def subsampled_report(case, keep, eta=0.5, batch_size=4):
    x, t = case.inputs[keep], case.targets[keep]
    operator = PerSampleHessians(case.model, x, t, case.loss_fn, hessian=HessianOperator(case.model, x, t, case.loss_fn))
    return compute_non_uniformity(operator, learning_rate=eta, batch_size=batch_size, num_samples=40, tol=1e-8)


def test_subsample_standard_errors_are_the_first_order_formula_written_out(forty_samples):
    case, hessians = forty_samples
    n, m, eta, b = 40, 20, 0.5, 4
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(100))[:m].sort().values
    report = subsampled_report(case, keep, eta, b)
    # Dense: D_i = H_i - H over the subsample, u and w the top eigenvectors of Sigma and of the
    # stability matrix, and the standard error of a mean of m of n terms drawn without replacement.
    chosen = [hessians[i] for i in keep.tolist()]
    h, sigma = dense_sigma(chosen)
    deviations = [hi - h for hi in chosen]
    fpc = math.sqrt((n - m) / (n - 1))
    u = torch.linalg.eigh(sigma).eigenvectors[:, -1]
    q = torch.stack([(d @ u).square().sum() for d in deviations])
    s = math.sqrt(torch.linalg.eigvalsh(sigma)[-1].item())
    assert report["value"] == pytest.approx(s, rel=1e-8)
    assert report["value_stderr"] == pytest.approx(q.std().item() / math.sqrt(m) * fpc / (2 * s), rel=1e-6)
    w = torch.linalg.eigh(stability_matrix(h, sigma, eta, n, b)).eigenvectors[:, -1]
    c = (n - b) / (b * (n - 1))
    r = torch.stack([-2 * eta * (w @ d @ w) + 2 * eta**2 * ((h @ w) @ d @ w) + eta**2 * c * (d @ w).square().sum()
                     for d in deviations])
    assert report["stability_eigenvalue_stderr"] == pytest.approx(r.std().item() / math.sqrt(m) * fpc, rel=1e-6)


def test_subsample_standard_error_against_the_spread_over_subsamples(forty_samples):
    case, hessians = forty_samples
    generator = torch.Generator().manual_seed(0)
    spread = torch.tensor([math.sqrt(torch.linalg.eigvalsh(dense_sigma([hessians[i] for i in
                           torch.randperm(40, generator=generator)[:20].tolist()])[1])[-1].item())
                           for _ in range(300)]).std().item()
    reported = [subsampled_report(case, torch.randperm(40, generator=torch.Generator().manual_seed(100 + k))[:20]
                                  .sort().values)["value_stderr"] for k in range(4)]
    # A first-order error from one subsample of 20: measured 1.0-2.1x the spread of s over 300
    # subsamples (its heavy-tailed terms make single estimates noisy); on average within 2x.
    assert 0.5 * spread <= sum(reported) / 4 <= 2 * spread
    # Every sample used: Sigma is exact, and so is s (to the solver's tolerance).
    everything = subsampled_report(case, torch.arange(40))
    assert everything["value_stderr"] == 0.0 and everything["stability_eigenvalue_stderr"] == 0.0
