"""Hostile files, built here, sent as an attacker with a valid token would: through a server in its
own process (its memory measured) and through ``curvscope analyze --local``.

Each is refused with INVALID_ARGUMENT or RESOURCE_EXHAUSTED and one line (or, where the payload
sits in a part curvscope never reads, analysed normally); no payload runs; the server stays up
and within a few hundred MB of its baseline.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from curvscope import Client
from curvscope.client import CurvscopeError
from server_process import ServerProcess

sys.path.insert(0, str(Path(__file__).parent / "loading"))
from loading_fixtures import evil_pickle, rewrite_archive  # noqa: E402

MAX_GROWTH_MB = 300


def _export(path: Path) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).eval()
    torch.export.save(torch.export.export(model, (torch.randn(4, 64),), dynamic_shapes=({0: torch.export.Dim("batch")},)), path)
    return path


def _safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _case_folded_sample_inputs(marker: Path) -> bytes:
    """The archive member that ran code in the server: torch's reader takes a/data.PKL for a/data.pkl."""
    saved = io.BytesIO()
    torch.save(((torch.zeros(2, 64),), {}), saved)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(saved.getvalue())) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            name = info.filename.split("/", 1)[1]
            dst.writestr(f"a/x/{name}" if name == "data.pkl" else f"a/{name}", src.read(info))
            if name == "data.pkl":
                dst.writestr("a/data.PKL", evil_pickle(marker))
    return out.getvalue()


def _nested_bomb() -> bytes:
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/data.pkl", bytes(300 << 20))
    return bomb.getvalue()


def _sequential_header(layers: list[dict], tensors: dict | None = None) -> bytes:
    config = {"input_shape": [64], "layers": layers}
    return json.dumps({"__metadata__": {"architecture": "sequential", "config": json.dumps(config)}, **(tensors or {})}).encode()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, dict[str, tuple[Path, set[str]]]]:
    """name -> (file, the outcomes allowed); and the marker any payload would create."""
    folder = tmp_path_factory.mktemp("hostile")
    marker = folder / "ran"
    good = _export(folder / "good.pt2")
    deep = b"[" * 200_000 + b"]" * 200_000
    files = {
        "case_folded_sample_inputs": (
            rewrite_archive(good, folder / "case.pt2", replace={"data/sample_inputs/model.pt": _case_folded_sample_inputs(marker)}),
            {"OK"},  # the sample inputs are never read: the model is analysed, the payload never runs
        ),
        "nested_zip_bomb": (rewrite_archive(good, folder / "bomb.pt2", replace={"data/sample_inputs/model.pt": _nested_bomb()}), {"OK"}),
        "pickled_weight": (
            rewrite_archive(good, folder / "pickled.pt2", replace={
                "data/weights/model_weights_config.json": json.dumps({"config": {"0.weight": {
                    "path_name": "weight_0", "is_param": True, "use_pickle": True, "tensor_meta": None}}}).encode(),
                "data/weights/weight_0": evil_pickle(marker)}),
            {"INVALID_ARGUMENT"},
        ),
        "deep_program": (rewrite_archive(good, folder / "deep.pt2", replace={"models/model.json": deep}), {"INVALID_ARGUMENT"}),
        "deep_safetensors_header": (_safetensors(folder / "deep.safetensors", deep), {"INVALID_ARGUMENT"}),
        "deep_metadata_config": (
            _safetensors(folder / "deepcfg.safetensors", json.dumps({"__metadata__": {"architecture": "sequential", "config": deep.decode()}}).encode()),
            {"INVALID_ARGUMENT"},
        ),
        "dtype_as_list": (
            _safetensors(folder / "dtype.safetensors", json.dumps({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}).encode(), bytes(4)),
            {"INVALID_ARGUMENT"},
        ),
        "huge_declared_layer": (
            _safetensors(folder / "huge.safetensors", _sequential_header([
                {"type": "linear", "in_features": 64, "out_features": 16000}, {"type": "linear", "in_features": 16000, "out_features": 16000}])),
            {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"},
        ),
        "many_empty_tensors": (
            _safetensors(folder / "many.safetensors", json.dumps(
                {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(400_000)}).encode()),
            {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"},
        ),
        "torch_save_pickle": (folder / "evil.pt", {"INVALID_ARGUMENT"}),
    }
    torch.save({"w": torch.zeros(1)}, files["torch_save_pickle"][0])
    return marker, files


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("data") / "data.safetensors"
    save_file({"inputs": torch.randn(32, 64), "targets": torch.randint(0, 10, (32,))}, str(path))
    return path


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _outcome(call) -> tuple[str, str]:
    try:
        call()
        return "OK", ""
    except CurvscopeError as error:
        return error.code, error.message


def test_hostile_files_through_the_server(tmp_path, hostile, data_file):
    marker, files = hostile
    with ServerProcess(["--store", str(tmp_path / "store")]) as server, Client(server.target) as client:
        client.analyze(files["case_folded_sample_inputs"][0].with_name("good.pt2"), data_file, eigen=1)
        baseline = _peak_rss_mb(server.process.pid)
        for name, (path, allowed) in files.items():
            for what, call in (
                ("DescribeModel", lambda: client.describe(path)),
                ("Analyze", lambda: client.analyze(path, data_file, eigen=1)),
            ):
                code, message = _outcome(call)
                assert code in allowed, (name, what, code, message)
                assert "Traceback" not in message and "\n" not in message, (name, message)
            assert not marker.exists(), name
        growth = _peak_rss_mb(server.process.pid) - baseline
        assert growth < MAX_GROWTH_MB, f"the server's peak RSS grew {growth:.0f} MB"
        assert server.process.poll() is None


# one file per reader in --local (each run starts an interpreter); the server test above has them all
LOCAL_CASES = ["case_folded_sample_inputs", "pickled_weight", "deep_safetensors_header", "huge_declared_layer", "torch_save_pickle"]


def test_hostile_files_through_local_mode(hostile, data_file):
    marker, files = hostile
    for name in LOCAL_CASES:
        path, allowed = files[name]
        done = subprocess.run(
            [str(Path(sys.executable).parent / "curvscope"), "analyze", str(path), "--data", str(data_file), "--local", "--eigen", "1"],
            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        expected = 0 if allowed == {"OK"} else 2
        assert done.returncode == expected, (name, done.returncode, done.stderr[-1500:])
        assert "Traceback" not in done.stderr, (name, done.stderr[-1500:])
        assert not marker.exists(), name


def test_local_mode_refuses_a_bad_file_uri_as_input_error():
    from curvscope import CurvscopeError as ClientError
    from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb
    from curvscope_service.local import analyze_local

    request = pb.AnalyzeRequest(model=pb.ModelRef(uri="file:///tmp/model%00.pt2"), loss="cross_entropy")
    with pytest.raises(ClientError) as info:
        analyze_local(request)
    assert info.value.code == "INVALID_ARGUMENT" and "%00" in info.value.message


def test_a_server_vets_inputs_in_a_capped_child(tmp_path, hostile):
    """With an address space too small for any load, the child fails and the server answers for it."""
    good = hostile[1]["case_folded_sample_inputs"][0].with_name("good.pt2")
    with ServerProcess(["--store", str(tmp_path / "store"), "--load-memory-mib", "64"]) as server, Client(server.target) as client:
        code, message = _outcome(lambda: client.describe(good))
        assert code in ("RESOURCE_EXHAUSTED", "INVALID_ARGUMENT") and "MiB" in message, (code, message)
        assert server.process.poll() is None
