"""Real .pt2 archives, mutated the ways an attacker would: never code, never a crash, bounded memory.

Every accepted archive loads with every unpickler patched to fail, so no path from user bytes
reaches one. Mutations rename (case-folded, re-nested, moved out of the archive folder),
duplicate, drop, truncate and replace members; each either loads or is refused with
INVALID_ARGUMENT, and the marker that any payload would create never appears.
"""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from curvscope_service.errors import CurvscopeError
from curvscope_service.loading import load_model
from loading_fixtures import REFERENCE, evil_pickle


@pytest.fixture(autouse=True)
def no_unpickler(monkeypatch):
    """Every road to an unrestricted unpickler fails loudly for the length of a test."""

    def refuse(*args, **kwargs):
        raise AssertionError("an unpickler was reached with user bytes")

    for owner, name in (
        (pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load"),
        (torch._C, "_pickle_load_obj"), (torch.serialization, "_load"),
    ):
        monkeypatch.setattr(owner, name, refuse)


def _export(model: nn.Module, example: torch.Tensor, path: Path, dynamic: bool = True) -> Path:
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(model.eval(), (example,), dynamic_shapes=dynamic_shapes), path)
    return path


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[Path, tuple[nn.Module, torch.Tensor]]:
    """Archives curvscope accepts, each with its module and an input: MLPs, a CNN with batch norm
    and pooling, a net with tied weights."""
    folder = tmp_path_factory.mktemp("accepted")
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(48, 4)
    )
    cnn[1].running_mean.uniform_(-0.5, 0.5)
    tied = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    tied[2].weight = tied[0].weight
    cases = [
        (nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), torch.randn(5, 4), "mlp.pt2", True),
        (nn.Sequential(nn.Linear(4, 3)), torch.randn(6, 4), "static.pt2", False),
        (cnn, torch.randn(2, 1, 8, 8), "cnn.pt2", True),
        (tied, torch.randn(3, 4), "tied.pt2", True),
    ]
    return {_export(model, x, folder / name, dynamic): (model, x) for model, x, name, dynamic in cases}


@pytest.fixture(scope="module")
def accepted(originals) -> list[Path]:
    """The archives above and the LipSDP reference networks."""
    return [*originals, *sorted((REFERENCE / "lipsdp").glob("*.pt2"))]


def test_every_accepted_archive_loads_without_an_unpickler(accepted):
    for path in accepted:
        assert load_model(path).num_parameters > 0


def test_every_accepted_state_dict_and_batch_loads_without_an_unpickler(cnn_file, digits_files):
    from curvscope_service.loading import load_data

    for model in (cnn_file[0], digits_files[0]):
        assert load_model(model).num_parameters > 0
    assert load_data(digits_files[1]).num_samples > 0


def test_loaded_archives_compute_what_the_exported_models_compute(originals):
    for path, (model, x) in originals.items():
        torch.testing.assert_close(load_model(path).module(x), model(x), rtol=1e-6, atol=1e-6)


# --- mutations --------------------------------------------------------------------------------

def _members(path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as zf:
        return [(info.filename, zf.read(info)) for info in zf.infolist()]


def _write(members: list[tuple[str, bytes]], path: Path) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, payload in members:
            zf.writestr(zipfile.ZipInfo(name), payload)


def _mutate(members: list[tuple[str, bytes]], kind: str, index: int, amount: int, marker: Path) -> list[tuple[str, bytes]]:
    members = list(members)
    name, payload = members[index % len(members)]
    root, _, rest = name.partition("/")
    position = index % len(members)
    if kind == "case_fold":
        members[position] = (f"{root}/{rest.upper()}", payload)
    elif kind == "duplicate_case_folded_with_payload":
        members.append((f"{root}/{rest.swapcase()}", evil_pickle(marker)))
    elif kind == "duplicate":
        members.append((name, payload))
    elif kind == "re_nest":
        members[position] = (f"{root}/x/{rest}", payload)
    elif kind == "other_folder":
        members[position] = (f"other/{rest}", payload)
    elif kind == "dot_dot":
        members[position] = (f"{root}/../{rest}", payload)
    elif kind == "absolute":
        members[position] = (f"/{name}", payload)
    elif kind == "drop":
        del members[position]
    elif kind == "truncate":
        members[position] = (name, payload[: amount % (len(payload) + 1)])
    elif kind == "pickle_payload":
        members[position] = (name, evil_pickle(marker))
    elif kind == "flip_byte" and payload:
        flipped = bytearray(payload)
        flipped[amount % len(payload)] ^= 0x5A
        members[position] = (name, bytes(flipped))
    elif kind == "json_use_pickle" and rest.endswith("_config.json"):
        config = json.loads(payload)
        for entry in config["config"].values():
            entry["use_pickle"] = True
        members[position] = (name, json.dumps(config).encode())
    return members


_KINDS = [
    "case_fold", "duplicate_case_folded_with_payload", "duplicate", "re_nest", "other_folder", "dot_dot",
    "absolute", "drop", "truncate", "pickle_payload", "flip_byte", "json_use_pickle",
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    archive=st.integers(0, 3),
    mutations=st.lists(st.tuples(st.sampled_from(_KINDS), st.integers(0, 10_000), st.integers(0, 1 << 20)), min_size=1, max_size=3),
)
def test_mutated_archives_load_or_are_refused_and_run_nothing(accepted, tmp_path, archive, mutations):
    marker = tmp_path / "ran"
    members = _members(accepted[archive])
    for kind, index, amount in mutations:
        members = _mutate(members, kind, index, amount, marker)
    path = tmp_path / "mutated.pt2"
    _write(members, path)
    try:
        load_model(path)
    except CurvscopeError as e:
        assert e.code == "INVALID_ARGUMENT", e
        assert "\n" not in str(e) and len(str(e)) < 400
    assert not marker.exists()


def test_the_whole_file_truncated_anywhere_is_refused(accepted, tmp_path):
    data = accepted[0].read_bytes()
    for cut in range(0, len(data), max(1, len(data) // 40)):
        path = tmp_path / "cut.pt2"
        path.write_bytes(data[:cut])
        with pytest.raises(CurvscopeError) as info:
            load_model(path)
        assert info.value.code == "INVALID_ARGUMENT"


# --- memory -------------------------------------------------------------------------------------


def _hostile_archives(src: Path, folder: Path) -> list[Path]:
    """Each declares far more than it holds: inflation, tensors, counts, nesting. The first is
    accepted: its 300 MB nested bomb sits in the sample inputs, which are never read."""
    members = dict(_members(src))
    root = next(iter(members)).split("/", 1)[0]
    config_name = f"{root}/data/weights/model_weights_config.json"
    paths = []

    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/data.pkl", bytes(300 << 20))
    with zipfile.ZipFile(folder / "nested_bomb.pt2", "w", zipfile.ZIP_DEFLATED) as zf:
        for name, payload in members.items():
            zf.writestr(name, bomb.getvalue() if name.endswith("sample_inputs/model.pt") else payload)
    paths.append(folder / "nested_bomb.pt2")

    with zipfile.ZipFile(folder / "deflated_program.pt2", "w", zipfile.ZIP_DEFLATED) as zf:
        for name, payload in members.items():
            zf.writestr(name, payload + b" " * (300 << 20) if name.endswith("models/model.json") else payload)
    paths.append(folder / "deflated_program.pt2")

    config = json.loads(members[config_name])
    entry = next(iter(config["config"].values()))
    entry["tensor_meta"]["sizes"] = [{"as_int": 1 << 20}, {"as_int": 1 << 20}]
    entry["tensor_meta"]["strides"] = [{"as_int": 1 << 20}, {"as_int": 1}]
    zero_size = f"{root}/data/weights/{entry['path_name']}"
    _write([(n, json.dumps(config).encode() if n == config_name else b"" if n == zero_size else p) for n, p in members.items()],
           folder / "huge_declared_tensor.pt2")
    paths.append(folder / "huge_declared_tensor.pt2")

    many = {"config": {f"w{i}": {**entry, "path_name": "w"} for i in range(60_000)}}
    _write([(n, json.dumps(many).encode() if n == config_name else p) for n, p in members.items()], folder / "many_tensors.pt2")
    paths.append(folder / "many_tensors.pt2")

    _write([(n, b"[" * 200_000 + b"]" * 200_000 if n.endswith("models/model.json") else p) for n, p in members.items()],
           folder / "deep_json.pt2")
    paths.append(folder / "deep_json.pt2")
    return paths


def test_hostile_archives_are_refused_within_a_bounded_memory(accepted, tmp_path):
    """In a fresh interpreter: each file refused, and the peak RSS grows less than 100 MB over loading a real model."""
    paths = _hostile_archives(accepted[0], tmp_path)
    script = textwrap.dedent(
        f"""
        import resource, sys
        from curvscope_service.loading import load_model
        from curvscope_service.errors import CurvscopeError
        load_model({str(accepted[2])!r})
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for path in {[str(p) for p in paths]!r}:
            try:
                load_model(path)
                print("ACCEPTED", path)
            except CurvscopeError as e:
                print(e.code, str(e)[:120])
        print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(paths) + 1, lines
    assert lines[0].startswith("ACCEPTED"), lines
    assert all(line.startswith(("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")) for line in lines[1:-1]), lines
    growth_kb = int(lines[-1].split()[1])
    assert growth_kb < 100 * 1024, lines
