"""Analyses of Hugging Face checkpoint folders through the service and the CLI, against dense
float64 truths: a GPT-2 as a causal language model (labels shifted by one, padding ignored) and a
BERT sequence classifier. Masked tokens change nothing.

The dense truths differentiate the loaded module (the same one transformers builds from the files,
checked in tests/service/loading/test_hugging_face_folders.py) with torch.autograd.functional in
float64: torch.func's vmap'd second derivatives through layer_norm are off on torch 2.13 (see
tests/dense_reference.py). Every eigenvalue is compared with a relative tolerance of 1e-6 of the
spectrum's scale (the solver runs to a Ritz residual of 1e-8 in float64).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from curvscope.cli import main
from curvscope_service.loading import load_model
from hugging_face_folders import save_folder, tiny_model, token_batch

TOLERANCE = 1e-6


def _causal_lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of each token given the ones before it, over the tokens attention counts."""
    labels = ids.masked_fill(mask == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def _flat(module: torch.nn.Module):
    params = dict(module.named_parameters())
    names = list(params)
    shapes, sizes = [params[k].shape for k in names], [params[k].numel() for k in names]

    def unflatten(theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: t.reshape(s) for k, t, s in zip(names, theta.split(sizes), shapes)}

    return names, sizes, torch.cat([params[k].detach().reshape(-1) for k in names]), unflatten


def dense_hessian(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], loss_of_logits) -> torch.Tensor:
    """The Hessian of loss_of_logits(module(*inputs)) over all parameters, in named_parameters() order."""
    _, _, theta, unflatten = _flat(module)
    return torch.autograd.functional.hessian(
        lambda t: loss_of_logits(torch.func.functional_call(module, unflatten(t), inputs)), theta)


def dense_ggn(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """J^T H_loss J of the mean cross entropy of (n, C) logits: H_loss = (diag(p) - p p^T) / n per sample."""
    _, _, theta, unflatten = _flat(module)
    logits = module(*inputs).detach()
    jacobian = torch.autograd.functional.jacobian(
        lambda t: torch.func.functional_call(module, unflatten(t), inputs), theta)  # (n, C, P)
    p = logits.softmax(-1)
    h_loss = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / len(p)
    return torch.einsum("ncp,ncd,ndq->pq", jacobian, h_loss, jacobian)


def _block_indices(names: list[str], sizes: list[int], block: list[str]) -> torch.Tensor:
    starts = torch.tensor([0, *sizes]).cumsum(0)
    return torch.cat([torch.arange(starts[i], starts[i + 1]) for i, name in enumerate(names) if name in block])


def _assert_spectrum(results: dict, exact: torch.Tensor, largest: int, smallest: int) -> None:
    """``results``: a report's results, or its per_layer entry of one block."""
    eigen = results["hessian_eigen"]
    assert eigen["converged"]
    scale = exact.abs().max().item()
    assert eigen["largest"] == pytest.approx(exact.flip(0)[:largest].tolist(), abs=TOLERANCE * scale)
    assert eigen["smallest"] == pytest.approx(exact[:smallest].tolist(), abs=TOLERANCE * scale)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> tuple[Path, Path, torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A one-layer GPT-2 folder (1,144 parameters), a padded token batch without targets, the
    module as the service loads it (float64) and the batch's tensors."""
    root = tmp_path_factory.mktemp("gpt2")
    folder = save_folder(tiny_model("GPT2LMHeadModel", n_layer=1), root / "gpt2")
    ids, mask = token_batch()
    data = root / "tokens.safetensors"
    save_file({"input_ids": ids, "attention_mask": mask}, str(data))
    return folder, data, load_model(folder, dtype=torch.float64).module, ids, mask


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> tuple[Path, Path, torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor]:
    """A one-layer BERT sequence classifier folder with 3 labels, a padded batch with targets."""
    root = tmp_path_factory.mktemp("bert")
    folder = save_folder(tiny_model("BertForSequenceClassification", num_hidden_layers=1), root / "bert")
    ids, mask = token_batch()
    types = (torch.arange(ids.shape[1]) >= 5).long().expand_as(ids).contiguous()
    targets = torch.tensor([0, 1, 2, 1, 0, 2])
    data = root / "labelled.safetensors"
    save_file({"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "targets": targets}, str(data))
    return folder, data, load_model(folder, dtype=torch.float64).module, (ids, mask, types), targets


def test_causal_lm_spectrum_matches_the_dense_hessian(client, gpt2):
    folder, data, module, ids, mask = gpt2
    report = client.analyze(folder, data, task="causal-lm", eigen=3, smallest=2, tolerance=1e-8,
                            precision="float64").to_dict()
    exact = torch.linalg.eigvalsh(dense_hessian(module, (ids, mask), lambda logits: _causal_lm_loss(logits, ids, mask)))
    _assert_spectrum(report["results"], exact, 3, 2)
    assert report["model"]["format"] == "hugging_face"
    assert report["loss"]["value"] == pytest.approx(_causal_lm_loss(module(ids, mask), ids, mask).item(), rel=1e-12)


def test_masked_tokens_change_nothing_in_the_analysis(client, gpt2, tmp_path):
    folder, data, _, ids, mask = gpt2
    other = tmp_path / "other-padding.safetensors"
    save_file({"input_ids": torch.where(mask.bool(), ids, 7), "attention_mask": mask}, str(other))
    options = dict(task="causal-lm", eigen=2, smallest=1, tolerance=1e-8, precision="float64")
    first, second = client.analyze(folder, data, **options).to_dict(), client.analyze(folder, other, **options).to_dict()
    for key in ("largest", "smallest"):
        assert second["results"]["hessian_eigen"][key] == pytest.approx(first["results"]["hessian_eigen"][key], rel=1e-9)
    assert second["loss"]["value"] == pytest.approx(first["loss"]["value"], rel=1e-12)


def test_sequence_classification_spectrum_per_block_matches_the_dense_hessian(client, bert):
    folder, data, module, inputs, targets = bert
    report = client.analyze(folder, data, task="sequence-classification", eigen=2, smallest=1, tolerance=1e-8,
                            precision="float64", per_layer=True).to_dict()
    hessian = dense_hessian(module, inputs, lambda logits: F.cross_entropy(logits, targets))
    _assert_spectrum(report["results"], torch.linalg.eigvalsh(hessian), 2, 1)
    from curvscope_service.loading.hugging_face import parameter_blocks

    blocks = parameter_blocks(module)
    assert list(report["per_layer"]) == list(blocks)
    names, sizes, _, _ = _flat(module)
    for block in ("classifier", "bert.encoder.layer.0.attention"):
        rows = _block_indices(names, sizes, blocks[block])
        _assert_spectrum(report["per_layer"][block], torch.linalg.eigvalsh(hessian[rows][:, rows]), 2, 1)


def test_sequence_classification_gauss_newton_matches_the_dense_ggn(client, bert):
    """Forward-mode products through the eager attention (torch's fused attention has none on the CPU)."""
    folder, data, module, inputs, _ = bert
    report = client.analyze(folder, data, task="sequence-classification", eigen=3, tolerance=1e-8,
                            precision="float64", curvature="ggn").to_dict()
    exact = torch.linalg.eigvalsh(dense_ggn(module, inputs))
    _assert_spectrum(report["results"], exact, 3, 0)


def test_cli_analyses_a_folder_locally_as_a_causal_lm(gpt2, tmp_path, capsys):
    folder, data, module, ids, mask = gpt2
    out = tmp_path / "report.json"
    code = main(["analyze", str(folder), "--data", str(data), "--task", "causal-lm", "--local", "--eigen", "2",
                 "--tolerance", "1e-8", "--precision", "float64", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    exact = torch.linalg.eigvalsh(dense_hessian(module, (ids, mask), lambda logits: _causal_lm_loss(logits, ids, mask)))
    _assert_spectrum(json.loads(out.read_text())["results"], exact, 2, 0)
