"""``curvscope demo --transformer``: a tiny GPT-2 trained in seconds on generated sentences, written
as a Hugging Face checkpoint folder, analysed through an in-process server."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from curvscope.cli import main
from curvscope_service.demo import demo_text, write_transformer_demo_files
from curvscope_service.loading import load_model


def test_the_text_is_the_same_on_every_machine():
    sentences = demo_text(3)
    assert sentences == demo_text(3) and all(s.endswith(".") for s in sentences)
    assert demo_text(3, seed=1) != sentences


def test_the_demo_model_learns_the_text_in_seconds(tmp_path):
    """Held-out next-character loss far below a uniform guess (ln 26 = 3.26 nats), in < 60 s on one core."""
    started = time.perf_counter()
    folder, data = write_transformer_demo_files(tmp_path)
    seconds = time.perf_counter() - started
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(folder)  # as the server will: our readers, the allow-listed class
    assert loaded.architecture == "GPT2LMHeadModel" and 20_000 < loaded.num_parameters < 40_000
    batch = load_file(str(data))
    assert sorted(batch) == ["attention_mask", "input_ids"] and batch["input_ids"].dtype == torch.int64
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any(), "the sentences are padded: the mask matters"
    with torch.no_grad():
        logits = loaded.module(ids, mask)
    labels = ids.masked_fill(mask == 0, -100)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    assert loss < 1.0 < math.log(logits.shape[-1])
    assert seconds < 60


def test_demo_transformer_prints_a_report(capsys, tmp_path):
    out = tmp_path / "demo.json"
    assert main(["demo", "--transformer", "--json", str(out)]) == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["model"]["format"] == "hugging_face"
    eigen = report["results"]["hessian_eigen"]
    assert eigen["converged"] and len(eigen["largest"]) == 5 and len(eigen["smallest"]) == 2
    assert {"transformer.wte", "transformer.h.0.attn", "transformer.h.1.mlp"} <= set(report["per_layer"])
    assert "Hessian eigenvalues" in capsys.readouterr().out
