"""Models and batches in memory: the bytes the client builds pass the service's own readers, the
analyses of an nn.Module match a dense float64 Hessian, and nothing already on the server is
sent twice."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile

import pytest
import safetensors.torch
import torch
from torch import nn

import curvscope
from curvscope import in_memory
from curvscope_service.loading.checkpoint import load_model
from curvscope_service.loading.data import load_data
from curvscope_service.loading.pt2_archive import read_archive
from curvscope_service.loading.safetensors_file import SafetensorsReader
from tests.dense_reference import dense_hessian


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))


def small_cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


class TokenClassifier(nn.Module):
    """A module with named integer inputs, as a Hugging Face model takes them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.embedding = nn.Embedding(30, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embedding(input_ids)
        if token_type_ids is not None:
            hidden = hidden + token_type_ids.unsqueeze(-1)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def token_batch(n: int = 10) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    mask = torch.ones(n, 5, dtype=torch.int64)
    mask[::2, 3:] = 0
    return {"input_ids": torch.randint(0, 30, (n, 5), generator=generator), "attention_mask": mask,
            "targets": torch.randint(0, 3, (n,), generator=generator)}


def batch(n: int = 48, shape: tuple[int, ...] = (6,), classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    return torch.randn(n, *shape, generator=generator), torch.randint(0, classes, (n,), generator=generator)


# -- the batch file -----------------------------------------------------------------------------
def test_batch_bytes_read_back_by_the_service_reader_and_the_safetensors_library(tmp_path):
    tensors = {"inputs": torch.randn(5, 3, 2), "targets": torch.arange(5), "mask": torch.rand(5, 4) > 0.5,
               "half": torch.randn(5, 2).half(), "brain": torch.randn(5, 2).bfloat16(),
               "bytes": torch.randint(0, 255, (5, 1), dtype=torch.uint8), "strided": torch.randn(3, 5).t()}
    content = in_memory.safetensors_bytes(tensors)
    path = tmp_path / "batch.safetensors"
    path.write_bytes(content)
    library = safetensors.torch.load(content)  # an independent parser of the format
    with SafetensorsReader(path, what="data") as reader:  # the server's own, which checks the tiling
        ours = {name: reader.read(name) for name in reader.header.tensors}
    for name, tensor in tensors.items():
        for read in (library[name], ours[name]):
            assert read.dtype == tensor.dtype and torch.equal(read, tensor), name


def test_a_pair_of_tensors_is_the_inputs_and_targets_the_data_loader_reads(tmp_path):
    x, y = batch()
    prepared = in_memory.prepare("model.pt2", (x, y))
    assert prepared.model is None  # a path stays a path
    path = tmp_path / prepared.data.filename
    path.write_bytes(prepared.data.content)
    loaded = load_data(path)
    assert len(loaded.inputs) == 1 and torch.equal(loaded.inputs[0], x) and torch.equal(loaded.targets, y) and loaded.num_samples == len(x)


def test_batch_layouts_follow_the_contract():
    ids, mask, y = token_batch().values()
    assert list(in_memory.split_batch({"input_ids": ids, "attention_mask": mask, "labels": y}).tensors()) == [
        "input_ids", "attention_mask", "targets"]
    assert list(in_memory.split_batch(((ids, mask), y)).tensors()) == ["inputs.0", "inputs.1", "targets"]
    assert list(in_memory.split_batch(ids).tensors()) == ["inputs"]  # no targets (a causal-LM batch)
    assert list(in_memory.split_batch({"input_ids": ids, "targets": y}).tensors()) == ["inputs", "targets"]


@pytest.mark.parametrize("data, message", [
    ((torch.zeros(4, 2), torch.zeros(3)), "different numbers of samples"),
    ((torch.zeros(4, 2), torch.zeros(4), torch.zeros(4)), "not tuple of 3 items"),
    ({"targets": torch.zeros(4)}, "no input tensor"),
    ((torch.tensor(1.0), None), "scalar"),
    ((torch.zeros(4, 2), [1, 2, 3, 4]), "targets must be a torch.Tensor"),
    ((torch.zeros(4, 2, dtype=torch.complex64), torch.zeros(4)), "dtype torch.complex64"),
])
def test_a_batch_the_server_cannot_read_is_refused_before_anything_is_sent(data, message):
    with pytest.raises((ValueError, TypeError), match=message):
        in_memory.prepare("model.pt2", data)


# -- the exported module ------------------------------------------------------------------------
@pytest.mark.parametrize("make, shape, classes", [(mlp, (6,), 4), (small_cnn, (1, 8, 8), 3)])
def test_a_typical_module_exports_to_an_archive_the_server_loads(tmp_path, make, shape, classes):
    module = make()
    module.train()
    x, y = batch(n=5, shape=shape, classes=classes)
    prepared = in_memory.prepare(module, (x, y))
    assert module.training and all(m.training for m in module.modules())  # the caller's mode is left alone
    path = tmp_path / "model.pt2"
    path.write_bytes(prepared.model.content)
    loaded = load_model(path)
    assert loaded.format == "torch_export" and loaded.fixed_batch_size is None  # a dynamic batch dimension
    with zipfile.ZipFile(path) as archive:  # no example batch rides along (a pickle no server reads)
        assert all(info.file_size < 1024 for info in archive.infolist() if "sample_inputs" in info.filename)
    assert loaded.input_shape == shape
    module.eval()
    with torch.no_grad():  # any batch size, the module's eval-mode outputs
        for n in (1, 3, 17):
            inputs = torch.randn(n, *shape)
            torch.testing.assert_close(loaded.module(inputs), module(inputs), rtol=1e-6, atol=1e-6)


def test_named_inputs_are_exported_under_their_names_in_the_forwards_order(tmp_path):
    module = TokenClassifier()
    data = token_batch()
    reordered = {"attention_mask": data["attention_mask"], "input_ids": data["input_ids"], "targets": data["targets"]}
    split = in_memory.split_batch(reordered)
    exported = in_memory.export_module(module, split)
    assert exported.input_names == ["input_ids", "attention_mask"]
    content = in_memory.archive_bytes(exported.program)
    (tmp_path / "model.pt2").write_bytes(content)
    contents = read_archive(tmp_path / "model.pt2", max_parameters=10**6)  # the server's reader passes it
    assert set(contents.state_dict) == {"embedding.weight", "head.weight", "head.bias"}
    # Called by position, in the exported order, as the engine calls a model.
    program = torch.export.load(io.BytesIO(content))  # our own bytes: torch may read them here
    with torch.no_grad():
        torch.testing.assert_close(program.module()(data["input_ids"], data["attention_mask"]),
                                   module(data["input_ids"], data["attention_mask"]))


def test_named_inputs_that_skip_a_parameter_are_passed_by_name():
    module = TokenClassifier()
    data = token_batch()
    data["token_type_ids"] = torch.randint(0, 2, (10, 5))
    del data["attention_mask"]  # input_ids and token_type_ids: the forward's first and third parameters
    split = in_memory.split_batch(data)
    exported = in_memory.export_module(module, split)
    assert exported.input_names == ["input_ids", "token_type_ids"]
    assert list(split.tensors(exported.input_names)) == ["input_ids", "token_type_ids", "targets"]
    program = torch.export.load(io.BytesIO(in_memory.archive_bytes(exported.program)))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(data["input_ids"], data["token_type_ids"]),
                                   module(data["input_ids"], token_type_ids=data["token_type_ids"]))


def test_the_same_module_gives_the_same_bytes():
    module, (x, y) = mlp(), batch()
    first, second = in_memory.prepare(module, (x, y)), in_memory.prepare(module, (x, y))
    assert first.model.sha256 == second.model.sha256 and first.data.sha256 == second.data.sha256
    with torch.no_grad():
        module[0].weight[0, 0] += 1e-3
    assert in_memory.prepare(module, (x, y)).model.sha256 != first.model.sha256


def test_a_module_off_the_cpu_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match="the module is on meta.*pass a CPU copy"):
        in_memory.prepare(mlp().to("meta"), batch())


def test_a_module_needs_its_batch_as_tensors():
    with pytest.raises(ValueError, match="pass data as tensors"):
        in_memory.prepare(mlp(), "batch.safetensors")
    with pytest.raises(TypeError, match="nn.Module or a path"):
        in_memory.prepare(torch.zeros(3), batch())


# -- end to end ---------------------------------------------------------------------------------
def test_module_and_tensors_in_report_out_match_the_dense_hessian(client):
    module, (x, y) = mlp(), batch()
    report = client.analyze(module, (x, y), eigen=3, smallest=1, precision="float64", tolerance=1e-8)
    eigenvalues = torch.linalg.eigvalsh(dense_hessian(module.double(), x.double(), y, nn.functional.cross_entropy))
    module.float()
    # Independent truth: the dense float64 Hessian's spectrum; the solve's residual tolerance 1e-8.
    torch.testing.assert_close(torch.tensor(list(report.results.hessian_eigen.largest), dtype=torch.float64),
                               eigenvalues.flip(0)[:3], rtol=1e-6, atol=1e-9)
    assert report.results.hessian_eigen.smallest[0] == pytest.approx(eigenvalues[0].item(), rel=1e-6, abs=1e-9)
    assert report.message.data.num_samples == len(x) and report.message.model.format == "torch_export"
    assert report.message.loss.value == pytest.approx(nn.functional.cross_entropy(module(x), y).item(), rel=1e-5)


def test_local_gives_the_servers_report(client):
    module, (x, y) = small_cnn(), batch(n=24, shape=(1, 8, 8), classes=3)
    options = dict(eigen=2, trace=True, precision="float64", seed=5)
    remote = client.analyze(module, (x, y), **options)
    here = curvscope.analyze(module, (x, y), local=True, **options)
    assert here.message.model.sha256 == remote.message.model.sha256  # the same bytes
    assert here.message.data.sha256 == remote.message.data.sha256
    # The same engine on the same bytes; float64 sums may differ in the last bits across threads.
    torch.testing.assert_close(torch.tensor(list(here.results.hessian_eigen.largest)),
                               torch.tensor(list(remote.results.hessian_eigen.largest)), rtol=1e-9, atol=1e-12)
    assert here.results.hessian_trace.estimate == pytest.approx(remote.results.hessian_trace.estimate, rel=1e-9)


def test_analyze_connects_to_the_server_it_is_given(server):
    module, (x, y) = mlp(), batch(n=20)
    report = curvscope.analyze(module, (x, y), server=server.target, eigen=1)
    assert report.message.data.num_samples == 20 and report.message.model.format == "torch_export"


def test_local_takes_a_model_file_with_tensors(digits_files):
    model_path, data_path = digits_files
    tensors = safetensors.torch.load_file(data_path)
    from_tensors = curvscope.analyze(model_path, (tensors["inputs"], tensors["targets"]), local=True, eigen=1)
    from_files = curvscope.analyze(model_path, data_path, local=True, eigen=1)
    assert from_tensors.message.model.sha256 == from_files.message.model.sha256
    assert from_tensors.results.hessian_eigen.largest[0] == pytest.approx(from_files.results.hessian_eigen.largest[0],
                                                                          rel=1e-6)


def test_local_without_memfd_uses_a_private_folder_it_removes(tmp_path, monkeypatch):
    monkeypatch.delattr("os.memfd_create")  # as on macOS or Windows
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    module, (x, y) = mlp(), batch(n=16)
    with_folder = curvscope.analyze(module, (x, y), local=True, eigen=1)
    assert list(tmp_path.iterdir()) == []  # nothing left behind
    monkeypatch.undo()
    in_memory_files = curvscope.analyze(module, (x, y), local=True, eigen=1)
    assert with_folder.results.hessian_eigen.largest[0] == in_memory_files.results.hessian_eigen.largest[0]


def test_local_reads_files_too(digits_files):
    model_path, data_path = digits_files
    report = curvscope.analyze(model_path, data_path, local=True, eigen=1)
    assert report.message.model.format == "safetensors" and report.results.hessian_eigen.largest[0] > 0


def test_what_the_server_holds_is_never_sent_again(client, monkeypatch):
    sent: list[int] = []
    upload = client._stub.Upload

    def counting(chunks, **kwargs):
        chunks = list(chunks)
        sent.append(chunks[0].header.size_bytes)
        return upload(iter(chunks), **kwargs)

    monkeypatch.setattr(client._stub, "Upload", counting)
    module, (x, y) = mlp(), batch(n=40)  # a batch no other test sends
    with torch.no_grad():
        module[0].bias.add_(0.5)  # and weights no other test sends
    data_bytes = len(in_memory.prepare("model.pt2", (x, y)).data.content)
    client.analyze(module, (x, y), eigen=1, seed=11)
    assert len(sent) == 2  # a new model and a new batch
    sent.clear()
    client.analyze(module, (x, y), eigen=1, seed=12)
    assert sent == []  # both already on the server
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    for _ in range(3):  # an epoch later: new weights, the same evaluation batch
        optimizer.zero_grad()
        nn.functional.cross_entropy(module(x), y).backward()
        optimizer.step()
        client.analyze(module, (x, y), eigen=1, seed=13)
        assert len(sent) == 1 and sent[0] != data_bytes  # only the model
        sent.clear()


def test_a_module_in_training_mode_is_analysed_in_eval_mode(client):
    module, (x, y) = small_cnn(), batch(n=16, shape=(1, 8, 8), classes=3)
    module.train()  # dropout on: an export in this mode would be refused
    report = client.analyze(module, (x, y), eigen=1)
    assert module.training
    module.eval()
    with torch.no_grad():
        assert report.message.loss.value == pytest.approx(nn.functional.cross_entropy(module(x), y).item(), rel=1e-5)


def test_several_named_inputs_end_to_end(client):
    module, data = TokenClassifier(), token_batch(n=12)
    report = client.analyze(module, data, eigen=2, precision="float64", tolerance=1e-8)
    ids, mask, targets = data["input_ids"], data["attention_mask"], data["targets"]
    parameters = dict(module.double().named_parameters())

    def loss(*flat: torch.Tensor) -> torch.Tensor:
        values = {**parameters, **dict(zip(parameters, flat))}
        logits = torch.func.functional_call(module, values, (ids, mask))
        return nn.functional.cross_entropy(logits, targets)

    hessian = torch.autograd.functional.hessian(loss, tuple(p.detach() for p in parameters.values()))
    sizes = [p.numel() for p in parameters.values()]
    dense = torch.cat([torch.cat([hessian[i][j].reshape(sizes[i], sizes[j]) for j in range(len(sizes))], 1)
                       for i in range(len(sizes))], 0)
    expected = torch.linalg.eigvalsh(dense).flip(0)[:2]
    torch.testing.assert_close(torch.tensor(list(report.results.hessian_eigen.largest), dtype=torch.float64),
                               expected, rtol=1e-6, atol=1e-9)


def test_the_client_never_loads_torch_or_numpy_itself():
    # torch is installed here; importing the client, its in-memory path and its callbacks'
    # shared part, and asking whether a value holds torch objects, must not load it (or numpy).
    code = ("import sys, curvscope, curvscope.in_memory as m, curvscope.callbacks; "
            "assert not m.holds_torch({'x': [1.0]}); "
            "print(sorted(name for name in ('torch', 'numpy', 'cvxpy') if name in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"
