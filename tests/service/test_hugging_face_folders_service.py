"""Hugging Face checkpoint folders over the wire: the client sends only the files the server reads
(each once, as blobs named by a manifest in ModelRef.folder), the server checks the manifest's
names, builds a folder of its stored blobs, or reads a file:// folder under its model roots."""

from __future__ import annotations

import json
import os
import shutil

import grpc
import pytest

from curvscope import CurvscopeError
from curvscope._files import manifest_digest, sha256_of_file
from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb
from curvscope._proto.curvscope.v1 import curvscope_pb2_grpc as pb_grpc
from hugging_face_folders import save_folder, tiny_model


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    folder = save_folder(tiny_model("GPT2LMHeadModel"), tmp_path_factory.mktemp("hf") / "gpt2")
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')  # never sent: the server reads no tokenizer
    return folder


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.CurvscopeStub(channel)


def test_a_folder_is_uploaded_once_and_described(client, gpt2_folder, monkeypatch):
    described = client.describe(gpt2_folder)
    assert described["format"] == "hugging_face" and described["architecture"] == "GPT2LMHeadModel"
    assert [block["name"] for block in described["blocks"]][:3] == ["transformer.wte", "transformer.wpe", "transformer.h.0.ln_1"]
    sent = {name: sha256_of_file(gpt2_folder / name) for name in ("config.json", "model.safetensors")}
    assert described["sha256"] == manifest_digest(sent)
    for name in ("tokenizer.json", "generation_config.json"):
        assert client.stat(sha256_of_file(gpt2_folder / name)) is None, f"{name} was sent"

    def no_upload(*args, **kwargs):
        raise AssertionError("a file the server holds was sent again")

    monkeypatch.setattr(client._stub, "Upload", no_upload)
    assert client.describe(gpt2_folder)["sha256"] == described["sha256"]


def test_a_sharded_folder_is_sent_as_its_shards(client, tmp_path):
    folder = save_folder(tiny_model("BertForSequenceClassification"), tmp_path / "bert", shard_bytes=2_000)
    manifest = client.upload_folder(folder)
    assert "model.safetensors.index.json" in manifest.files and len(manifest.files) > 3
    described = client.describe(folder)
    assert described["architecture"] == "BertForSequenceClassification"
    assert "bert.encoder.layer.1.attention" in [block["name"] for block in described["blocks"]]


@pytest.mark.parametrize("name", ["../config.json", "sub/config.json", "tokenizer.json", "", "config.json\x00"])
def test_manifest_names_are_checked(client, stub, gpt2_folder, name):
    manifest = client.upload_folder(gpt2_folder)
    manifest.files[name].CopyFrom(manifest.files["config.json"])
    with pytest.raises(grpc.RpcError) as error:
        stub.DescribeModel(pb.ModelRef(folder=manifest))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a checkpoint folder holds only config.json" in error.value.details()


def test_manifest_blobs_must_be_stored(client, stub, gpt2_folder):
    manifest = client.upload_folder(gpt2_folder)
    manifest.files["model.safetensors"].sha256 = "0" * 64
    with pytest.raises(grpc.RpcError) as error:
        stub.DescribeModel(pb.ModelRef(folder=manifest))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "model.safetensors of the folder" in error.value.details() and "upload it first" in error.value.details()
    manifest.files["model.safetensors"].sha256 = "not a digest"
    with pytest.raises(grpc.RpcError) as error:
        stub.DescribeModel(pb.ModelRef(folder=manifest))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as error:
        stub.DescribeModel(pb.ModelRef(folder=pb.FolderManifest()))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "names no files" in error.value.details()


def test_a_file_uri_folder_under_the_model_roots(client, server, gpt2_folder, tmp_path):
    root = server.config.model_roots[0]
    inside = shutil.copytree(gpt2_folder, root / "gpt2-uri")
    described = client.describe(inside.as_uri())
    assert described["architecture"] == "GPT2LMHeadModel"
    assert described["sha256"] == client.describe(gpt2_folder)["sha256"]  # the same files, the same digest
    with pytest.raises(CurvscopeError) as error:
        client.describe(gpt2_folder.as_uri())
    assert error.value.code == "PERMISSION_DENIED"
    linked = shutil.copytree(gpt2_folder, root / "gpt2-linked")
    (linked / "model.safetensors").unlink()
    os.symlink(gpt2_folder / "model.safetensors", linked / "model.safetensors")
    with pytest.raises(CurvscopeError) as error:
        client.describe(linked.as_uri())
    assert error.value.code == "PERMISSION_DENIED" and "links outside the server's model roots" in error.value.message
    with pytest.raises(CurvscopeError) as error:
        client.analyze(inside.as_uri(), inside.as_uri())
    assert error.value.code == "INVALID_ARGUMENT" and "the data URI names a folder" in error.value.message


def test_a_folder_asking_for_remote_code_is_refused(client, gpt2_folder, tmp_path):
    folder = shutil.copytree(gpt2_folder, tmp_path / "remote")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "evil.Model"}}))
    with pytest.raises(CurvscopeError) as error:
        client.describe(folder)
    assert error.value.code == "INVALID_ARGUMENT"
    assert "never runs remote code" in error.value.message and "auto_map" in error.value.message


def test_a_folder_without_config_is_refused_before_upload(client, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CurvscopeError) as error:
        client.describe(tmp_path)
    assert error.value.code == "INVALID_ARGUMENT" and "without config.json" in error.value.message


def test_weight_spectra_of_a_folder_through_the_server_and_locally(client, server, gpt2_folder, tmp_path, capsys):
    """Data-free: the spectral and Frobenius norms of every weight matrix, against torch.linalg on
    the file's tensors (relative 1e-5, float32), from the client, the CLI with --local and the CLI
    with --server; the report is schema-valid."""
    import jsonschema
    import torch
    from safetensors.torch import load_file

    from curvscope.cli import main
    from curvscope.report import json_schema

    weights = load_file(str(gpt2_folder / "model.safetensors"))
    remote = client.analyze(gpt2_folder, eigen=0, weight_spectra=True).to_dict()
    jsonschema.validate(remote, json_schema())
    out = tmp_path / "local.json"
    assert main(["analyze", str(gpt2_folder), "--local", "--weight-spectra", "--json", str(out)]) == 0
    local = json.loads(out.read_text())
    out = tmp_path / "cli.json"
    assert main(["analyze", str(gpt2_folder), "--server", server.target, "--weight-spectra", "--json", str(out)]) == 0
    cli = json.loads(out.read_text())
    for report in (remote, local, cli):
        assert report["model"]["format"] == "hugging_face"
        layers = {layer["name"]: layer for layer in report["results"]["weight_spectra"]["layers"]}
        assert "transformer.h.1.mlp.c_fc" in layers
        for name, layer in layers.items():
            matrix = weights[f"{name}.weight"].double()
            assert layer["spectral_norm"] == pytest.approx(torch.linalg.matrix_norm(matrix, 2).item(), rel=1e-5)
            assert layer["frobenius_norm"] == pytest.approx(torch.linalg.matrix_norm(matrix).item(), rel=1e-5)
    # one folder, one digest, however it is sent
    assert local["model"]["sha256"] == remote["model"]["sha256"] == cli["model"]["sha256"]
