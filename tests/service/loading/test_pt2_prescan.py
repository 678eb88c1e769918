"""Crafted .pt2 archives that would run code inside torch.export.load are refused unexecuted.

Each payload, if run, creates a marker file. A few tests first show that plain torch really
runs the payload, so the refusals below are tested against live ammunition.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import re
import zipfile

import pytest
import torch

from curvscope_service.errors import InvalidInput
from curvscope_service.loading import load_model
from curvscope_service.loading.pt2_prescan import _check_sample_inputs, prescan
from loading_fixtures import evil_pickle, read_json_member, read_member, rewrite_archive

WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
PROGRAM = "models/model.json"


def _pickled_weight(src, dst, marker):
    config = read_json_member(src, WEIGHTS_CONFIG)
    entry = config["config"]["0.weight"]
    entry["use_pickle"] = True
    return rewrite_archive(
        src, dst, replace={WEIGHTS_CONFIG: json.dumps(config).encode(), f"data/weights/{entry['path_name']}": evil_pickle(marker)}
    )


def _program_with(src, dst, edit):
    program = json.loads(read_member(src, PROGRAM))
    edit(program)
    return rewrite_archive(src, dst, replace={PROGRAM: json.dumps(program).encode()})


def _sympy_payload(marker) -> str:
    code = f"open({str(marker)!r}, 'w')"
    return "eval(" + "+".join(f"chr({ord(c)})" for c in code) + ")"


def _with_expression(src, dst, expression: str):
    text = read_member(src, PROGRAM).decode()
    text = re.sub(r'"expr_str": "[^"]*"', lambda _: json.dumps({"expr_str": expression})[1:-1], text, count=1)
    return rewrite_archive(src, dst, replace={PROGRAM: text.encode()})


# --- the payloads are live: plain torch runs them ---------------------------------------------


def test_plain_torch_unpickles_a_use_pickle_weight(exported_dynamic, tmp_path):
    marker = tmp_path / "ran"
    path = _pickled_weight(exported_dynamic[0], tmp_path / "evil.pt2", marker)
    with pytest.raises(Exception):
        torch.export.load(path)
    assert marker.exists()


def test_plain_torch_evals_symbolic_shapes(exported_dynamic, tmp_path):
    marker = tmp_path / "ran"
    path = _with_expression(exported_dynamic[0], tmp_path / "evil.pt2", _sympy_payload(marker))
    with pytest.raises(Exception):
        torch.export.load(path)
    assert marker.exists()


# --- curvscope refuses them -------------------------------------------------------------------


def test_pickled_weight_is_refused_unexecuted(exported_dynamic, tmp_path, refuses):
    marker = tmp_path / "ran"
    path = _pickled_weight(exported_dynamic[0], tmp_path / "evil.pt2", marker)
    with refuses(InvalidInput, "'0.weight'", "pickle", "never unpickles"):
        load_model(path)
    assert not marker.exists()


def test_symbolic_shape_code_is_refused_unexecuted(exported_dynamic, tmp_path, refuses):
    marker = tmp_path / "ran"
    path = _with_expression(exported_dynamic[0], tmp_path / "evil.pt2", _sympy_payload(marker))
    with refuses(InvalidInput, "symbolic shape", "not plain arithmetic"):
        load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "expression",
    ["__import__('os')", "Symbol('s0').__class__", "Max(s0, 2)[0]", "Symbol('os')", "lambda: 1", "s0 ** s0"],
)
def test_other_expressions_are_refused(exported_dynamic, tmp_path, refuses, expression):
    path = _with_expression(exported_dynamic[0], tmp_path / "evil.pt2", expression)
    with refuses(InvalidInput, "symbolic shape"):
        load_model(path)


def test_pickled_sample_inputs_are_refused_unexecuted(exported_dynamic, tmp_path, refuses):
    marker = tmp_path / "ran"
    path = rewrite_archive(exported_dynamic[0], tmp_path / "evil.pt2", replace={"data/sample_inputs/model.pt": evil_pickle(marker)})
    with refuses(InvalidInput, "sample inputs", "never unpickles"):
        load_model(path)
    assert not marker.exists()


def _torch_save_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _with_data_pkl(saved: bytes, data_pkl: bytes) -> bytes:
    """A torch.save zip whose pickle is replaced, the way an attacker would craft it."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(saved)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, data_pkl if info.filename.endswith("/data.pkl") else src.read(info))
    return out.getvalue()


class _BuildPayload:
    """Unpickling this calls ``__setstate__`` through the BUILD opcode."""

    def __reduce__(self):
        return (collections.OrderedDict, (), {"x": 1})


@pytest.mark.parametrize("protocol", [2, 4])
def test_torch_save_zip_with_a_code_pickle_is_refused_unexecuted(exported_dynamic, tmp_path, refuses, protocol):
    marker = tmp_path / "ran"
    payload = _with_data_pkl(_torch_save_bytes(((torch.zeros(2, 3),), {})), evil_pickle(marker, protocol=protocol))
    path = rewrite_archive(exported_dynamic[0], tmp_path / "evil.pt2", replace={"data/sample_inputs/model.pt": payload})
    with refuses(InvalidInput, "sample inputs", "imports", "never unpickles"):
        load_model(path)
    assert not marker.exists()


def test_sample_inputs_with_other_opcodes_than_tensor_rebuilds_are_refused(exported_dynamic, tmp_path, refuses):
    payload = _with_data_pkl(_torch_save_bytes(((torch.zeros(2, 3),), {})), pickle.dumps(_BuildPayload(), protocol=2))
    path = rewrite_archive(exported_dynamic[0], tmp_path / "odd.pt2", replace={"data/sample_inputs/model.pt": payload})
    with refuses(InvalidInput, "sample inputs", "BUILD"):
        load_model(path)


@pytest.mark.parametrize(
    "sample",
    [((torch.zeros(2, 3),), {}), ((torch.zeros(2, 3, dtype=torch.float64), [torch.ones(1, dtype=torch.long)]), {"mask": torch.ones(2, dtype=torch.bool)})],
)
def test_the_opcode_scan_accepts_what_torch_save_writes_for_tensors(sample, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("the pre-scan unpickled the sample inputs")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)
    for protocol in (2, 4):
        buffer = io.BytesIO()
        torch.save(sample, buffer, pickle_protocol=protocol)
        _check_sample_inputs(buffer.getvalue())


def test_a_plain_archive_is_prescanned_without_unpickling(exported_dynamic, monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("the pre-scan unpickled"))
    prescan(exported_dynamic[0])


@pytest.mark.parametrize("legacy", ["data/weights/model.pt", "data/constants/model.pt"])
def test_legacy_pickled_files_are_refused_unexecuted(exported_dynamic, tmp_path, refuses, legacy):
    marker = tmp_path / "ran"
    path = rewrite_archive(exported_dynamic[0], tmp_path / "evil.pt2", add={legacy: evil_pickle(marker)})
    with refuses(InvalidInput, "legacy pickled file", legacy):
        load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("path_name", "use_pickle", "fragment"),
    [
        ("tensor_0", True, "as a pickle"),
        ("custom_obj_0", False, "custom or opaque object"),
        ("opaque_obj_0", False, "custom or opaque object"),
    ],
)
def test_pickled_constants_are_refused_unexecuted(exported_dynamic, tmp_path, refuses, path_name, use_pickle, fragment):
    marker = tmp_path / "ran"
    config = {"config": {"lifted": {"path_name": path_name, "is_param": False, "use_pickle": use_pickle, "tensor_meta": None}}}
    path = rewrite_archive(
        exported_dynamic[0],
        tmp_path / "evil.pt2",
        replace={CONSTANTS_CONFIG: json.dumps(config).encode()},
        add={f"data/constants/{path_name}": evil_pickle(marker)},
    )
    with refuses(InvalidInput, "'lifted'", fragment):
        load_model(path)
    assert not marker.exists()


def test_guard_code_is_refused(exported_dynamic, tmp_path, refuses):
    marker = tmp_path / "ran"
    path = _program_with(
        exported_dynamic[0], tmp_path / "evil.pt2", lambda p: p.update(guards_code=[f"open({str(marker)!r}, 'w') is not None"])
    )
    with refuses(InvalidInput, "guard code"):
        load_model(path)
    assert not marker.exists()


def test_non_aten_call_targets_are_refused(exported_dynamic, tmp_path, refuses):
    def edit(program):
        program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.serialization.os.getcwd"

    path = _program_with(exported_dynamic[0], tmp_path / "evil.pt2", edit)
    with refuses(InvalidInput, "torch.serialization.os.getcwd", "only aten operators"):
        load_model(path)


def test_names_that_would_inject_into_generated_code_are_refused(exported_dynamic, tmp_path, refuses):
    def edit(program):
        text = json.dumps(program).replace('"input"', json.dumps('input=print("x")'))
        program.clear()
        program.update(json.loads(text))

    path = _program_with(exported_dynamic[0], tmp_path / "evil.pt2", edit)
    with refuses(InvalidInput, "invalid name"):
        load_model(path)


def test_line_breaks_in_metadata_are_refused(exported_dynamic, tmp_path, refuses):
    def edit(program):
        program["graph_module"]["graph"]["nodes"][0]["metadata"]["custom"] = '{"note": "a\\nimport os"}'

    path = _program_with(exported_dynamic[0], tmp_path / "evil.pt2", edit)
    with refuses(InvalidInput, "node metadata"):
        load_model(path)


def test_keyword_names_in_the_input_spec_are_checked(exported_dynamic, tmp_path, refuses):
    def edit(program):
        signature = program["graph_module"]["module_call_graph"][0]["signature"]
        signature["in_spec"] = signature["in_spec"].replace('"context": "null"', '"context": "[\\"a\'\\"]"', 1)

    path = _program_with(exported_dynamic[0], tmp_path / "evil.pt2", edit)
    with refuses(InvalidInput, "invalid input name"):
        load_model(path)


def test_top_level_legacy_layout_is_refused(exported_dynamic, tmp_path, refuses):
    marker = tmp_path / "ran"
    path = rewrite_archive(
        exported_dynamic[0], tmp_path / "evil.pt2", add={"/version": b"8.0", "/serialized_state_dict.pt": evil_pickle(marker)}
    )
    with refuses(InvalidInput, "outside the archive folder"):
        load_model(path)
    assert not marker.exists()


def test_case_colliding_members_are_refused(exported_dynamic, tmp_path, refuses):
    path = rewrite_archive(exported_dynamic[0], tmp_path / "evil.pt2", add={"DATA/weights/model_weights_config.json": b"{}"})
    with refuses(InvalidInput, "duplicate member"):
        load_model(path)


def test_compiled_payloads_are_refused(exported_dynamic, tmp_path, refuses):
    path = rewrite_archive(exported_dynamic[0], tmp_path / "evil.pt2", add={"data/aotinductor/model/model.so": b"\x7fELF"})
    with refuses(InvalidInput, "data/aotinductor/model/model.so", "not supported"):
        load_model(path)


def test_zip_bomb_is_refused(exported_dynamic, tmp_path, refuses):
    path = tmp_path / "bomb.pt2"
    rewrite_archive(exported_dynamic[0], path)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
        root = zf.namelist()[0].split("/", 1)[0]
        zf.writestr(f"{root}/extra/zeros", bytes(8 << 20))
    with refuses(InvalidInput, "zip bomb"):
        load_model(path)
