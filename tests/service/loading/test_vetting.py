"""Inputs are loaded first in a memory-capped child: its verdict is the server's, its crash is not."""

from __future__ import annotations

import json

import pytest
import torch

from curvscope_service.errors import InvalidInput, ResourceExhausted
from curvscope_service.loading.vetting import Vetter
from curvscope_service.store import sha256_of_file
from loading_fixtures import evil_pickle, read_json_member, rewrite_archive

WEIGHTS_CONFIG = "data/weights/model_weights_config.json"


@pytest.fixture
def vetter():
    vetter = Vetter()
    yield vetter
    vetter.close()


def test_archives_that_load_pass_in_one_child_and_verdicts_are_kept(exported_dynamic, tmp_path, vetter):
    copy = rewrite_archive(exported_dynamic[0], tmp_path / "copy.pt2")
    for path in (exported_dynamic[0], exported_dynamic[0], copy):
        vetter.check_model(path, sha256_of_file(path))
    assert vetter.children_started == 1


def test_a_refused_archive_gets_the_readers_message_and_a_new_child_serves_the_next(exported_dynamic, tmp_path, vetter, refuses):
    marker = tmp_path / "ran"
    config = read_json_member(exported_dynamic[0], WEIGHTS_CONFIG)
    config["config"]["0.weight"]["use_pickle"] = True
    path = rewrite_archive(exported_dynamic[0], tmp_path / "evil.pt2", replace={
        WEIGHTS_CONFIG: json.dumps(config).encode(), f"data/weights/{config['config']['0.weight']['path_name']}": evil_pickle(marker)})
    for _ in range(2):
        with refuses(InvalidInput, "'0.weight'", "never unpickles"):
            vetter.check_model(path, sha256_of_file(path))
    assert vetter.children_started == 2  # the verdict was kept: one child read the file, once, and was replaced
    vetter.check_model(exported_dynamic[0], sha256_of_file(exported_dynamic[0]))
    assert vetter.children_started == 2  # the replacement serves the next file
    assert not marker.exists()


def test_a_child_over_its_memory_cap_is_refused_and_the_caller_lives(exported_dynamic):
    # 64 MiB of address space cannot hold a load next to the interpreter and torch: the child
    # fails the way a reader blown up by a hostile file would
    vetter = Vetter(base_memory_mib=64)
    try:
        with pytest.raises((ResourceExhausted, InvalidInput)) as info:
            vetter.check_model(exported_dynamic[0], sha256_of_file(exported_dynamic[0]))
        assert "MiB" in str(info.value)
    finally:
        vetter.close()
    assert torch.ones(1).item() == 1.0


def test_an_allocation_failed_in_c_code_counts_as_the_memory_cap(exported_dynamic, monkeypatch):
    """Under the address-space cap C code may fail an allocation without a MemoryError
    (SystemError: "error return without exception set"): the reader lets it through instead of
    calling the file malformed, and the child reports it as the cap (RESOURCE_EXHAUSTED)."""
    import io
    import sys

    from torch._export.serde.serialize import ExportedProgramDeserializer

    from curvscope_service import loading
    from curvscope_service.loading import vetting
    from curvscope_service.loading.torch_export import load_exported

    def fails(*args, **kwargs):
        raise SystemError("error return without exception set")

    with monkeypatch.context() as patched:
        patched.setattr(ExportedProgramDeserializer, "deserialize", fails)
        with pytest.raises(SystemError):
            load_exported(exported_dynamic[0], max_parameters=10**6)

    request = {"kind": "model", "path": str(exported_dynamic[0]), "format": "", "architecture": "", "config": "",
               "max_parameters": 0, "memory_mib": 64}
    monkeypatch.setattr(vetting.resource, "setrlimit", lambda *args: None)  # no cap on this process
    monkeypatch.setattr(loading, "load_model", fails)
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(request) + "\n"))
    threads = torch.get_num_threads()
    try:
        assert vetting._child() == vetting._EXIT_MEMORY
    finally:
        torch.set_num_threads(threads)


def test_a_data_batch_is_vetted_too(tmp_path, vetter, refuses):
    path = tmp_path / "data.safetensors"
    path.write_bytes(evil_pickle(tmp_path / "ran"))
    with refuses(InvalidInput, "data"):
        vetter.check_data(path, sha256_of_file(path))
    assert not (tmp_path / "ran").exists()
