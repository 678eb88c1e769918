"""Inputs are loaded first in a memory-capped child: its verdict is the server's, its crash is not."""

from __future__ import annotations

import pytest
import torch

from curvscope_service.errors import InvalidInput, ResourceExhausted
from curvscope_service.loading.vetting import Vetter
from loading_fixtures import evil_pickle, rewrite_archive


def test_an_archive_that_loads_passes_and_its_verdict_is_kept(exported_dynamic):
    vetter = Vetter()
    vetter.check_model(exported_dynamic[0])
    vetter.check_model(exported_dynamic[0])
    assert vetter.children_started == 1


def test_a_refused_archive_gets_the_readers_message_from_the_child(exported_dynamic, tmp_path, refuses):
    marker = tmp_path / "ran"
    path = rewrite_archive(exported_dynamic[0], tmp_path / "evil.pt2", replace={"models/model.json": b"[" * 100_000})
    vetter = Vetter()
    with refuses(InvalidInput, "nests JSON deeper"):
        vetter.check_model(path)
    with refuses(InvalidInput, "nests JSON deeper"):
        vetter.check_model(path)
    assert vetter.children_started == 1
    assert not marker.exists()


def test_a_child_over_its_memory_cap_is_refused_and_the_caller_lives(exported_dynamic, refuses):
    # 64 MiB of address space cannot even hold the interpreter and torch: the child fails the
    # way a reader blown up by a hostile file would, and the caller answers RESOURCE_EXHAUSTED
    vetter = Vetter(base_memory_mib=64)
    with pytest.raises((ResourceExhausted, InvalidInput)) as info:
        vetter.check_model(exported_dynamic[0])
    assert "MiB" in str(info.value)
    assert torch.ones(1).item() == 1.0


def test_a_data_batch_is_vetted_too(tmp_path, refuses):
    path = tmp_path / "data.safetensors"
    path.write_bytes(evil_pickle(tmp_path / "ran"))
    with refuses(InvalidInput, "data"):
        Vetter().check_data(path)
    assert not (tmp_path / "ran").exists()
