"""Small models and data shared by the curvature benchmarks.

scikit-learn's handwritten digits (8x8 images, 10 classes): a 64-32-10 MLP and a small CNN
with BatchNorm, each trained briefly so the Hessian is that of a sensible checkpoint, then put
in eval mode (BatchNorm on running statistics). Both have under 3000 parameters, so a dense
Hessian serves as the truth.
"""

from __future__ import annotations

import importlib
import time
import warnings
from collections.abc import Callable

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from curvscope_service.curvature.operators.hessian import HessianOperator

BATCH = 512


def digits(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """All 1797 digits as (n, 1, 8, 8) images in [0, 1] and integer labels."""
    data = load_digits()
    inputs = torch.tensor(data.images / 16.0, dtype=dtype).unsqueeze(1)
    return inputs, torch.tensor(data.target)


def batch(n: int = BATCH, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """The analysis batch: the first n digits, repeated when n exceeds the data set."""
    inputs, targets = digits(dtype)
    reps = -(-n // inputs.shape[0])
    return inputs.repeat(reps, 1, 1, 1)[:n], targets.repeat(reps)[:n]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 10),
    )


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {"mlp": mlp, "cnn": cnn}


class BasicBlock(nn.Module):
    """He et al.'s basic residual block: two 3x3 conv-BatchNorm layers, ReLU, identity or 1x1 shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(widths: tuple[int, ...] = (32, 64, 128), classes: int = 10) -> nn.Module:
    """A small ResNet for 3x32x32 inputs: stride-2 3x3 stem, one basic block per stage (the
    later ones halve the resolution), global average pooling, linear head. 308,650 parameters
    with the default widths, every conv followed by BatchNorm."""
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False),
                               nn.BatchNorm2d(widths[0]), nn.ReLU()]
    cin = widths[0]
    for i, width in enumerate(widths):
        layers.append(BasicBlock(cin, width, 1 if i == 0 else 2))
        cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def random_images(n: int, *, seed: int = 0, classes: int = 10) -> tuple[Tensor, Tensor]:
    """n random N(0, 1) 3x32x32 images and uniformly random labels (a fixed seed)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, classes, (n,), generator=generator)


def trained_resnet(n: int, *, steps: int = 30, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The ResNet after a few Adam steps in train mode on ``random_images(n)`` (so BatchNorm has
    running statistics of the data and the loss has moved off its initial value), in eval mode."""
    torch.manual_seed(0)
    model = resnet()
    inputs, targets = random_images(n)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimiser.step()
    return model.to(dtype).eval()


def trained(name: str, *, steps: int = 150, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The architecture trained for a few Adam steps on all digits, in eval mode."""
    torch.manual_seed(0)
    model = ARCHITECTURES[name]()
    inputs, targets = digits()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, inputs.shape[0], (128,), generator=generator)
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(inputs[idx]), targets[idx]).backward()
        optimiser.step()
    return model.to(dtype).eval()


def operator(name: str, *, dtype: torch.dtype = torch.float32, n: int = BATCH, **options) -> HessianOperator:
    inputs, targets = batch(n, dtype)
    return HessianOperator(trained(name, dtype=dtype), inputs, targets, nn.functional.cross_entropy, **options)


def dense_hessian(name: str, block: int = 8) -> Tensor:
    """The float64 Hessian of the mean cross-entropy on the analysis batch, column block by block."""
    op = operator(name, dtype=torch.float64)
    eye = torch.eye(op.dim, dtype=torch.float64)
    H = torch.cat([op.matmat(eye[:, j : j + block]) for j in range(0, op.dim, block)], dim=1)
    return (H + H.T) / 2


def median_seconds(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def gradient_seconds(op: HessianOperator, name: str) -> float:
    """One plain gradient (forward + backward of the mean loss) on the operator's batch."""
    model = trained(name, dtype=op.dtype)
    inputs, targets = batch(op.num_samples, op.dtype)

    def gradient() -> None:
        model.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()

    return median_seconds(gradient)


def pyhessian_solve(model: nn.Module, inputs: Tensor, targets: Tensor, k: int,
                    tol: float) -> tuple[Callable[[], list[float]], list[int]]:
    """PyHessian 0.1's ``hessian(...).eigenvalues(top_n=k, tol=tol)`` (deflated power iteration,
    at most 100 products per eigenvalue), ready to time: (the solve, its product count, filled in
    as it runs). Its graph is built here, in the constructor, before any clock starts; products are
    counted by wrapping its ``hessian_vector_product`` during the solve. Needs the ``bench`` extra."""
    # pyhessian/__init__ re-exports the class under the submodule's name: fetch the module.
    module = importlib.import_module("pyhessian.hessian")
    torch.manual_seed(0)
    with warnings.catch_warnings():  # its backward(create_graph=True) on the parameters' .grad
        warnings.filterwarnings("ignore", "Using backward\\(\\) with create_graph=True")
        computer = module.hessian(model, nn.CrossEntropyLoss(), data=(inputs, targets), cuda=inputs.is_cuda)
    counted = [0]

    def solve() -> list[float]:
        original = module.hessian_vector_product

        def counting(*args):
            counted[0] += 1
            return original(*args)

        module.hessian_vector_product = counting
        try:
            values, _ = computer.eigenvalues(maxIter=100, tol=tol, top_n=k)
        finally:
            module.hessian_vector_product = original
            model.zero_grad(set_to_none=True)
        return values

    return solve, counted


def curvlinops_solve(model: nn.Module, inputs: Tensor, targets: Tensor, k: int,
                     tol: float) -> tuple[Callable[[], list[float]], list[int]]:
    """curvlinops' Hessian through scipy's eigsh (ARPACK, "LA", float64, a seeded start), ready
    to time: (the solve, returning the k largest in decreasing order, and its product count)."""
    import numpy as np
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    params = [p for p in model.parameters() if p.requires_grad]
    H = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(inputs, targets)],
                              check_deterministic=False).to_scipy(np.float64)
    counted = [0]

    def matvec(x: np.ndarray) -> np.ndarray:
        counted[0] += 1
        return H @ x

    A = LinearOperator(H.shape, matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(H.shape[0])

    def solve() -> list[float]:
        return sorted(eigsh(A, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False).tolist(), reverse=True)

    return solve, counted


def _timed_in_wall_seconds(prepare: Callable[..., tuple[Callable[[], list[float]], list[int]]]):
    """A ``*_solve`` preparation turned into (model, inputs, targets, k, tol) -> (eigenvalues,
    products, wall seconds of the solve alone)."""

    def run(model: nn.Module, inputs: Tensor, targets: Tensor, k: int, tol: float) -> tuple[list[float], int, float]:
        solve, counted = prepare(model, inputs, targets, k, tol)
        start = time.perf_counter()
        values = solve()
        return values, counted[0], time.perf_counter() - start
    return run


pyhessian_eigen = _timed_in_wall_seconds(pyhessian_solve)
curvlinops_eigen = _timed_in_wall_seconds(curvlinops_solve)
