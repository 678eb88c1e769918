"""Crafted .pt2 archives that would run code inside torch.export.load never run it here.

Each payload, if run, creates a marker file. A few tests first show that plain torch really
runs the payload, so the refusals below are tested against live ammunition. Payloads in members
curvscope never reads (sample inputs, guard code, extra files) load as a model without running.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import zipfile

import pytest
import torch

from curvscope_service.errors import InvalidInput
from curvscope_service.loading import load_model
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


def _torch_save_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _case_folded_sample_inputs(marker) -> bytes:
    """The attack that reached torch: a benign ``a/x/data.pkl`` for a scan that reads names exactly,
    and the payload as ``a/data.PKL``, which torch's reader takes for ``a/data.pkl``."""
    benign = zipfile.ZipFile(io.BytesIO(_torch_save_bytes(((torch.zeros(2, 4),), {}))))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in benign.infolist():
            name = info.filename.split("/", 1)[1]
            if name == "data.pkl":
                dst.writestr("a/x/data.pkl", benign.read(info))
                dst.writestr("a/data.PKL", evil_pickle(marker))
            else:
                dst.writestr(f"a/{name}", benign.read(info))
    return out.getvalue()


def test_plain_torch_runs_a_case_folded_sample_input_payload(exported_dynamic, tmp_path):
    marker = tmp_path / "ran"
    path = rewrite_archive(exported_dynamic[0], tmp_path / "evil.pt2", replace={"data/sample_inputs/model.pt": _case_folded_sample_inputs(marker)})
    try:
        torch.export.load(path)
    except Exception:
        pass
    assert marker.exists()


@pytest.mark.parametrize("payload", ["case_folded", "plain_pickle", "torch_save_zip"])
def test_sample_inputs_are_never_read(exported_dynamic, tmp_path, payload):
    marker = tmp_path / "ran"
    member = {
        "case_folded": lambda: _case_folded_sample_inputs(marker),
        "plain_pickle": lambda: evil_pickle(marker),
        "torch_save_zip": lambda: _with_data_pkl(_torch_save_bytes(((torch.zeros(2, 3),), {})), evil_pickle(marker)),
    }[payload]()
    path = rewrite_archive(exported_dynamic[0], tmp_path / "evil.pt2", replace={"data/sample_inputs/model.pt": member})
    model = load_model(path)
    assert not marker.exists()
    x = torch.randn(3, 4)
    torch.testing.assert_close(model.module(x), exported_dynamic[1](x))


def test_a_nested_zip_bomb_in_the_sample_inputs_is_never_inflated(exported_dynamic, tmp_path):
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/data.pkl", bytes(64 << 20))
    path = rewrite_archive(exported_dynamic[0], tmp_path / "bomb.pt2", replace={"data/sample_inputs/model.pt": bomb.getvalue()})
    assert load_model(path).num_parameters == sum(p.numel() for p in exported_dynamic[1].parameters())


def _with_data_pkl(saved: bytes, data_pkl: bytes) -> bytes:
    """A torch.save zip whose pickle is replaced, the way an attacker would craft it."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(saved)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, data_pkl if info.filename.endswith("/data.pkl") else src.read(info))
    return out.getvalue()


@pytest.mark.parametrize("legacy", ["data/weights/model.pt", "data/constants/model.pt"])
def test_legacy_pickled_files_are_never_read(exported_dynamic, tmp_path, legacy):
    marker = tmp_path / "ran"
    path = rewrite_archive(exported_dynamic[0], tmp_path / "evil.pt2", add={legacy: evil_pickle(marker)})
    load_model(path)
    assert not marker.exists()


def test_an_archive_of_the_legacy_layout_is_refused_unexecuted(exported_dynamic, tmp_path, refuses):
    marker = tmp_path / "ran"
    path = rewrite_archive(
        exported_dynamic[0], tmp_path / "evil.pt2", drop={WEIGHTS_CONFIG}, add={"data/weights/model.pt": evil_pickle(marker)}
    )
    with refuses(InvalidInput, "lacks", WEIGHTS_CONFIG):
        load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("path_name", "use_pickle", "fragment"),
    [
        ("tensor_0", True, "as a pickle"),
        ("custom_obj_0", False, "custom and opaque objects"),
        ("opaque_obj_0", False, "custom and opaque objects"),
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


def test_guard_code_is_dropped_unexecuted(exported_dynamic, tmp_path):
    marker = tmp_path / "ran"
    path = _program_with(
        exported_dynamic[0], tmp_path / "evil.pt2", lambda p: p.update(guards_code=[f"open({str(marker)!r}, 'w') is not None"])
    )
    model = load_model(path)
    x = torch.randn(7, 4)
    torch.testing.assert_close(model.module(x), exported_dynamic[1](x))
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


def test_a_zip_bomb_in_a_member_that_is_read_is_refused_before_inflating(exported_dynamic, tmp_path, refuses):
    path = tmp_path / "bomb.pt2"
    program = read_member(exported_dynamic[0], PROGRAM) + b" " * (64 << 20)
    rewrite_archive(exported_dynamic[0], path, drop={PROGRAM})
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
        root = zf.namelist()[0].split("/", 1)[0]
        zf.writestr(f"{root}/{PROGRAM}", program)
    assert path.stat().st_size < 1 << 20
    with refuses(InvalidInput, "zip bomb", PROGRAM):
        load_model(path)


def test_a_zip_bomb_in_a_member_that_is_never_read_costs_nothing(exported_dynamic, tmp_path):
    path = tmp_path / "bomb.pt2"
    rewrite_archive(exported_dynamic[0], path)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
        root = zf.namelist()[0].split("/", 1)[0]
        zf.writestr(f"{root}/extra/zeros", bytes(64 << 20))
    load_model(path)


class _MaskedSequenceModel(torch.nn.Module):
    """A dynamic sequence dimension (shapes written as Mul/Pow of a symbol) and boolean masks
    combined with & (aten.__and__), as in Hugging Face attention code."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x):
        kept = torch.where((x > -1) & (x < 1), x, torch.zeros_like(x))
        scores = (kept @ kept.transpose(1, 2)).reshape(x.shape[0], -1)
        return self.linear(kept).reshape(x.shape[0], -1)[:, :3] + scores.mean(1, keepdim=True)


def test_a_dynamic_sequence_export_with_masks_loads_and_computes_the_same(tmp_path):
    torch.manual_seed(0)
    model = _MaskedSequenceModel().eval()
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=512)}
    path = tmp_path / "masked.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(4, 6, 4),), dynamic_shapes=(dims,)), path)
    program = read_member(path, PROGRAM).decode()
    assert "Pow(" in program and "Mul(" in program and "aten.__and__" in program
    loaded = load_model(path).module
    for shape in [(3, 5, 4), (1, 1, 4), (2, 40, 4)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize(
    "expression", ["(2^64)^64", "2^(2^40)", "((2**64)**64)**64", "1<<(2**34)", "Pow(Integer(2), Integer(64))", "Pow(s0, s0)"]
)
def test_expressions_that_compute_huge_numbers_are_refused(exported_dynamic, tmp_path, refuses, expression):
    path = _with_expression(exported_dynamic[0], tmp_path / "evil.pt2", expression)
    with refuses(InvalidInput, "symbolic shape"):
        load_model(path)


@pytest.mark.parametrize("target", ["torch.ops.aten.__class__.default", "torch.ops.aten.__and__.__init__", "torch.ops.aten.add.__dict__"])
def test_dunder_targets_other_than_aten_operators_are_refused(exported_dynamic, tmp_path, refuses, target):
    def edit(program):
        program["graph_module"]["graph"]["nodes"][0]["target"] = target

    path = _program_with(exported_dynamic[0], tmp_path / "evil.pt2", edit)
    with refuses(InvalidInput, "only aten operators"):
        load_model(path)


def test_the_parameter_cap_is_checked_on_the_config_before_any_weight_is_read(exported_dynamic, refuses, monkeypatch):
    from curvscope_service.errors import ResourceExhausted
    from curvscope_service.loading import pt2_archive

    def no_weight_reads(self, name, *, limit):
        assert not name.startswith("data/weights/weight"), f"read {name} before the cap was checked"
        return original(self, name, limit=limit)

    original = pt2_archive._Reader._read
    monkeypatch.setattr(pt2_archive._Reader, "_read", no_weight_reads)
    total = sum(p.numel() for p in exported_dynamic[1].parameters())
    with refuses(ResourceExhausted, f"declares {total} parameters", "over the limit of 10"):
        load_model(exported_dynamic[0], max_parameters=10)


@pytest.mark.parametrize(("fqn", "fragment"), [("0.weight\nimport os", "not a dotted name"), ("__import__('os')", "not a dotted name")])
def test_weight_names_that_are_not_attribute_paths_are_refused(exported_dynamic, tmp_path, refuses, fqn, fragment):
    config = read_json_member(exported_dynamic[0], WEIGHTS_CONFIG)
    config["config"][fqn] = config["config"].pop("0.weight")
    path = rewrite_archive(exported_dynamic[0], tmp_path / "odd.pt2", replace={WEIGHTS_CONFIG: json.dumps(config).encode()})
    with refuses(InvalidInput, fragment):
        load_model(path)


def test_booleans_other_than_0_and_1_are_refused(tmp_path, refuses):
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 2)
            self.register_buffer("mask", torch.tensor([True, False, True, True]))

        def forward(self, x):
            return self.linear(x * self.mask)

    path = tmp_path / "masked.pt2"
    torch.export.save(torch.export.export(Masked().eval(), (torch.randn(3, 4),)), path)
    config = read_json_member(path, WEIGHTS_CONFIG)
    mask_file = next(e["path_name"] for name, e in config["config"].items() if name == "mask")
    assert load_model(path).num_parameters == 10
    bad = rewrite_archive(path, tmp_path / "bad.pt2", replace={f"data/weights/{mask_file}": bytes([1, 0, 7, 1])})
    with refuses(InvalidInput, "booleans other than 0 and 1"):
        load_model(bad)
