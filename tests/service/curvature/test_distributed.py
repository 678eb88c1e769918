"""Data-parallel products over 2 gloo ranks (CPU): the same products, loss, gradient and
eigenvalues as one process on the whole batch, and the dense float64 Hessian as the truth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from curvscope_service.curvature.operators.distributed import main, shard_range
from curvscope_service.curvature.operators.hessian import HessianOperator
from curvscope_service.curvature.solvers.extreme_eigenvalues import compute_hessian_eigen
from curvscope_service.errors import InvalidInput
from curvscope_service.loading.checkpoint import load_model
from curvscope_service.loading.data import load_data
from curvscope_service.loading.sequential import save_sequential
from curvscope_service.losses import get_loss
from dense_reference import dense_hessian

CONFIG = {"input_shape": [6], "layers": [
    {"type": "linear", "in_features": 6, "out_features": 5}, {"type": "tanh"},
    {"type": "linear", "in_features": 5, "out_features": 3}]}
SAMPLES = 37  # uneven shards: 19 and 18
PRODUCTS = 3


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("distributed")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    save_sequential(directory / "model.safetensors", CONFIG, model.state_dict())
    save_file({"inputs": torch.randn(SAMPLES, 6), "targets": torch.randint(0, 3, (SAMPLES,))},
              str(directory / "data.safetensors"))
    return directory / "model.safetensors", directory / "data.safetensors"


def whole_batch(files: tuple[Path, Path], dtype: torch.dtype = torch.float64):
    model = load_model(files[0], dtype=dtype)
    data = load_data(files[1], dtype=dtype)
    return model, data


def torchrun(tmp_path: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    return result


@pytest.mark.parametrize("samples, world", [(37, 2), (10, 3), (8, 8), (1000, 7)])
def test_shards_cover_the_batch_once(samples, world):
    ranges = [shard_range(samples, rank, world) for rank in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == samples
    assert all(stop == start for (_, stop), (start, _) in zip(ranges, ranges[1:]))
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_fewer_samples_than_ranks_is_refused():
    with pytest.raises(InvalidInput, match="fewer ranks"):
        shard_range(3, 0, 4)
    with pytest.raises(ValueError):
        shard_range(10, 2, 2)


WORKER = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    from curvscope_service.curvature.operators.distributed import DataParallelOperator, init_from_environment, shard_range
    from curvscope_service.curvature.operators.hessian import HessianOperator
    from curvscope_service.curvature.solvers.extreme_eigenvalues import compute_hessian_eigen
    from curvscope_service.errors import InvalidInput
    from curvscope_service.loading.checkpoint import load_model
    from curvscope_service.loading.data import load_data
    from curvscope_service.losses import get_loss

    model_path, data_path, out = sys.argv[1:4]
    init_from_environment()
    rank, world = dist.get_rank(), dist.get_world_size()
    model = load_model(model_path, dtype=torch.float64)
    data = load_data(data_path, dtype=torch.float64)
    start, stop = shard_range(data.num_samples, rank, world)
    local = HessianOperator(model.module, data.inputs[0][start:stop], data.targets[start:stop],
                            get_loss("cross_entropy"), micro_batch_size=7)
    operator = DataParallelOperator(local, module=model.module)
    V = torch.randn(operator.dim, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = {"num_samples": operator.num_samples, "local_samples": stop - start,
              "matvec": operator.matvec(V[:, 0]).tolist(), "matmat": operator.matmat(V).tolist(),
              "loss": operator.loss(), "gradient": operator.gradient().tolist(), "hvps": operator.products}
    # float32, as a GPU would run it: the eigen solve on the distributed products.
    model32 = load_model(model_path, dtype=torch.float32)
    local32 = HessianOperator(model32.module, data.inputs[0][start:stop].float(), data.targets[start:stop],
                              get_loss("cross_entropy"), micro_batch_size=7)
    result["eigen32"] = compute_hessian_eigen(DataParallelOperator(local32), top_k=3, bottom_k=2, seed=5)
    with torch.no_grad():  # rank 1 loads "another checkpoint"
        if rank == 1:
            next(model.module.parameters())[0, 0] += 1e-3
    try:
        DataParallelOperator(local, module=model.module)
        result["mismatch"] = None
    except InvalidInput as error:
        result["mismatch"] = str(error)
    with open(f"{out}.{rank}.json", "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()
""")


def test_products_loss_and_gradient_over_two_ranks_match_the_dense_hessian(tmp_path, files):
    (tmp_path / "worker.py").write_text(WORKER)
    run = torchrun(tmp_path, "worker.py", str(files[0]), str(files[1]), str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{rank}.json").read_text()) for rank in range(2)]
    assert [r["local_samples"] for r in ranks] == [19, 18] and {r["num_samples"] for r in ranks} == {SAMPLES}

    model, data = whole_batch(files)
    loss_fn = get_loss("cross_entropy")
    H = dense_hessian(model.module, data.inputs, data.targets, loss_fn)
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    whole = HessianOperator(model.module, data.inputs, data.targets, loss_fn)
    for result in ranks:  # every rank holds the same global values
        torch.testing.assert_close(torch.tensor(result["matvec"], dtype=torch.float64), H @ V[:, 0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.tensor(result["matmat"], dtype=torch.float64), H @ V, rtol=1e-10, atol=1e-12)
        assert result["loss"] == pytest.approx(whole.loss(), rel=1e-12)
        torch.testing.assert_close(torch.tensor(result["gradient"], dtype=torch.float64), whole.gradient(), rtol=1e-10, atol=1e-12)
        assert result["hvps"] == 1 + V.shape[1]
        assert result["mismatch"] is not None and "different parameters" in result["mismatch"]

    model32, data32 = whole_batch(files, torch.float32)
    single = compute_hessian_eigen(HessianOperator(model32.module, data32.inputs, data32.targets, loss_fn),
                                   top_k=3, bottom_k=2, seed=5)
    for result in ranks:
        distributed = result["eigen32"]
        assert distributed["converged"] and single["converged"]
        assert distributed["largest"] == pytest.approx(single["largest"], rel=1e-5)
        assert distributed["smallest"] == pytest.approx(single["smallest"], rel=1e-5, abs=1e-5 * single["largest"][0])


def test_torchrun_eigenvalues_match_one_process(tmp_path, files):
    out = tmp_path / "eigen.json"
    run = torchrun(tmp_path, "-m", "curvscope_service.curvature.operators.distributed", str(files[0]), "--data", str(files[1]),
                   "--eigen", "3", "--smallest", "2", "--precision", "float64", "--micro-batch-size", "8",
                   "--seed", "5", "--json", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["backend"] == "gloo" and report["num_samples"] == SAMPLES

    model, data = whole_batch(files)
    operator = HessianOperator(model.module, data.inputs, data.targets, get_loss("cross_entropy"))
    single = compute_hessian_eigen(operator, top_k=3, bottom_k=2, seed=5)
    distributed = report["hessian_eigen"]
    assert distributed["converged"] and single["converged"]
    assert distributed["largest"] == pytest.approx(single["largest"], rel=1e-5)
    assert distributed["smallest"] == pytest.approx(single["smallest"], rel=1e-5, abs=1e-5 * single["largest"][0])

    exact = torch.linalg.eigvalsh(dense_hessian(model.module, data.inputs, data.targets, get_loss("cross_entropy")))
    assert distributed["largest"] == pytest.approx(exact[-3:].flip(0).tolist(), rel=1e-3)


def test_entry_point_reports_bad_input_in_one_line(tmp_path, files, capsys):
    # One rank in this process: the entry point joins the group that is already there.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    assert main([str(files[0]), "--data", str(files[1]), "--loss", "hinge"]) == 2
    assert not dist.is_initialized()
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "INVALID_ARGUMENT" in error and "unknown loss 'hinge'" in error
