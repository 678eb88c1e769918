"""Data-parallel curvature products over several devices (one pod or several) with torch.distributed.

Every rank holds the whole model and a contiguous shard of the batch. The loss is the mean over
all N samples, so H = sum_r (n_r / N) H_r, where H_r is the Hessian of the mean loss over rank
r's n_r samples: each rank computes its weighted local product and one all-reduce (sum) gives
every rank the same global product. The solver (Lanczos, trace, density) then runs unchanged and
identically on every rank: same seed, same products, same decisions, no further communication.
NCCL between GPUs, gloo between CPUs.

    torchrun --nproc-per-node 4 -m curvscope_service.curvature.operators.distributed \\
        model.safetensors --data batch.safetensors --eigen 5 --json report.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ...errors import CurvscopeError, InvalidInput
from .base import CurvatureOperator


def shard_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous shard; shard sizes differ by at most one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    if num_samples < world_size:
        raise InvalidInput(f"{num_samples} samples cannot be shared by {world_size} ranks; use fewer ranks")
    base, extra = divmod(num_samples, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class DataParallelOperator:
    """The global mean-loss operator from each rank's ``local`` operator over its shard.

    Collective: every rank must make the same calls in the same order (as the solvers do when
    they run with the same arguments everywhere). ``products`` counts this rank's local products,
    which equals the global count.
    """

    def __init__(self, local: CurvatureOperator, *, module: torch.nn.Module | None = None,
                 group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: start the ranks with torchrun")
        self.local = local
        self.group = group
        self.dim = local.dim
        self.dtype = local.dtype
        self.device = local.device
        self.param_names = getattr(local, "param_names", None)
        samples = torch.tensor([float(local.num_samples)], dtype=torch.float64, device=self.device)
        dist.all_reduce(samples, op=dist.ReduceOp.SUM, group=group)
        self.num_samples = int(samples.item())
        # This rank's share of the mean over all samples.
        self._weight = local.num_samples / self.num_samples
        # A rank with another model would silently mix two models into every product: compare
        # the sizes and, given the module, a fingerprint of the parameters (projections on fixed
        # pseudo-random directions) through one max-reduction of (x, -x).
        fingerprint = torch.tensor([float(self.dim)], dtype=torch.float64, device=self.device)
        if module is not None:
            flat = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in module.parameters()])
            directions = torch.randn(2, flat.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            fingerprint = torch.cat([fingerprint, directions.to(flat.device) @ flat])
        both = torch.cat([fingerprint, -fingerprint])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
        highest, lowest = both[: len(fingerprint)], -both[len(fingerprint):]
        if highest[0] != lowest[0]:
            raise InvalidInput("the ranks hold models of different sizes; every rank must load the same model")
        if not torch.allclose(highest, lowest, rtol=1e-12, atol=0.0):
            raise InvalidInput("the ranks hold different parameters; every rank must load the same checkpoint")

    @property
    def products(self) -> int:
        return self.local.products

    def matvec(self, v: Tensor) -> Tensor:
        return self._reduce(self.local.matvec(v))

    def matmat(self, V: Tensor) -> Tensor:
        return self._reduce(self.local.matmat(V))

    def loss(self) -> float:
        value = torch.tensor([self.local.loss()], dtype=torch.float64, device=self.device)
        return float(self._reduce(value).item())

    def gradient(self) -> Tensor:
        return self._reduce(self.local.gradient())

    def _reduce(self, local_product: Tensor) -> Tensor:
        out = local_product * self._weight
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out


def init_from_environment() -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    One rank per GPU with NCCL when CUDA is available, else gloo on the CPU.
    """
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return device


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchrun ... -m curvscope_service.curvature.operators.distributed",
        description="Extreme Hessian eigenvalues with the batch split across the ranks torchrun starts.")
    parser.add_argument("model", type=Path, help="a .pt2 or .safetensors checkpoint (every rank reads it)")
    parser.add_argument("--data", type=Path, required=True, help="a .safetensors batch with inputs and targets")
    parser.add_argument("--loss", default="cross_entropy", help="cross_entropy or mse")
    parser.add_argument("--eigen", type=int, default=1, help="how many largest eigenvalues")
    parser.add_argument("--smallest", type=int, default=0, help="how many smallest eigenvalues")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="relative Ritz residual to stop at")
    parser.add_argument("--max-hvps", type=int, default=500, help="product budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=("float32", "float64"), default="float32")
    parser.add_argument("--micro-batch-size", type=int, default=256, help="samples per micro-batch on each rank")
    parser.add_argument("--json", type=Path, help="rank 0 writes the result here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ...loading.checkpoint import load_model
    from ...loading.data import load_data
    from ...losses import bind_loss
    from .hessian import HessianOperator
    from ..solvers.extreme_eigenvalues import compute_hessian_eigen

    args = _parser().parse_args(argv)
    device = init_from_environment()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    dtype = torch.float64 if args.precision == "float64" else torch.float32
    try:
        model = load_model(args.model, device=device, dtype=dtype)
        data = load_data(args.data, dtype=dtype, model_inputs=model.inputs)  # on the host: only this rank's shard goes to the device
        start, stop = shard_range(data.num_samples, rank, world_size)
        if model.fixed_batch_size is not None and model.fixed_batch_size != stop - start:
            raise InvalidInput(f"the model was exported for batches of {model.fixed_batch_size} samples, a shard has "
                               f"{stop - start}; export it with a dynamic batch dimension")
        # the loss' normaliser (samples, or counted tokens) is the whole batch's, so that the
        # ranks' weighted shard losses add up to the global mean
        local = HessianOperator(model.module, tuple(x[start:stop] for x in data.inputs), data.targets[start:stop],
                                bind_loss(args.loss, data.targets), micro_batch_size=args.micro_batch_size)
        operator = DataParallelOperator(local, module=model.module)
        result = compute_hessian_eigen(operator, top_k=args.eigen, bottom_k=args.smallest, tol=args.tolerance,
                                       max_products=args.max_hvps, seed=args.seed)
        report = {"hessian_eigen": result, "loss": operator.loss(), "num_samples": operator.num_samples,
                  "world_size": world_size, "backend": dist.get_backend(), "device": str(device)}
    except CurvscopeError as error:
        print(f"rank {rank}: {error.code}: {error}", file=sys.stderr)
        dist.destroy_process_group()
        return 2
    if rank == 0:
        text = json.dumps(report, indent=2)
        if args.json:
            args.json.write_text(text + "\n")
        print(text)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
