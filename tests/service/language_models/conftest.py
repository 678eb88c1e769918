"""Tiny transformers built from ``transformers`` configs and exported to ``.pt2`` with several
inputs and dynamic batch and sequence dimensions: a BERT-style encoder with a classification head
and a GPT-style causal language model, with their data files and dense float64 truths.

The truths are independent of curvscope's losses: Hugging Face's own convention written out
(mean cross-entropy over the labels that are not -100, causal labels shifted by one), and the
Hessian by ``torch.autograd.functional.hessian`` (double backward; torch.func's vmap'd second
derivatives through layer_norm are unreliable, see tests/dense_reference.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from curvscope_service.loading.hugging_face import hide_broken_torchvision

hide_broken_torchvision()  # transformers imports torchvision when installed, even a broken one

transformers = pytest.importorskip("transformers")

VOCAB = 7
SAMPLES = 6
LENGTH = 5


class SequenceClassifier(nn.Module):
    """BertForSequenceClassification with the positional inputs curvscope feeds and logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


class CausalLM(nn.Module):
    """GPT2LMHeadModel with (input_ids, attention_mask) in and logits (n, T, vocab) out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def bert(attention: str = "eager") -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=4, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=6, max_position_embeddings=16, type_vocab_size=2, num_labels=3,
                        attn_implementation=attention)
    return SequenceClassifier(BertForSequenceClassification(config)).eval()


def gpt(attention: str = "eager") -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=4, n_layer=1, n_head=2, n_positions=16, n_inner=6,
                        attn_implementation=attention)
    return CausalLM(GPT2LMHeadModel(config)).eval()


def export(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> Path:
    """The export recipe of docs/formats.md: dynamic batch and sequence dimensions, every input."""
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=16)
    shapes = tuple({0: batch, 1: length} for _ in example)
    torch.export.save(torch.export.export(module, example, dynamic_shapes=shapes), str(path))
    return path


def token_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Token ids with padding at the end of some rows (attention_mask 0 there)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (SAMPLES, LENGTH), generator=generator)
    mask = torch.ones(SAMPLES, LENGTH, dtype=torch.long)
    mask[1, 3:] = 0
    mask[4, 4:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


@dataclass
class Case:
    model: Path
    data: Path
    task: str
    module: nn.Module  # the eager module (float32)
    inputs: tuple[torch.Tensor, ...]
    targets: torch.Tensor


@pytest.fixture(scope="session")
def bert_case(tmp_path_factory) -> Case:
    root = tmp_path_factory.mktemp("bert")
    tokens = token_batch()
    types = torch.zeros_like(tokens["input_ids"])
    types[:, 3:] = 1
    inputs = (tokens["input_ids"], tokens["attention_mask"], types)
    targets = torch.arange(SAMPLES) % 3
    module = bert()
    save_file({**tokens, "token_type_ids": types, "targets": targets}, str(root / "data.safetensors"))
    return Case(export(module, inputs, root / "bert.pt2"), root / "data.safetensors", "", module, inputs, targets)


@pytest.fixture(scope="session")
def gpt_case(tmp_path_factory) -> Case:
    root = tmp_path_factory.mktemp("gpt")
    tokens = token_batch(seed=2)
    inputs = (tokens["input_ids"], tokens["attention_mask"])
    module = gpt()
    save_file(tokens, str(root / "data.safetensors"))  # no targets: causal-lm derives them
    labels = tokens["input_ids"].masked_fill(tokens["attention_mask"] == 0, -100)
    return Case(export(module, inputs, root / "gpt.pt2"), root / "data.safetensors", "causal-lm", module, inputs, labels)


def reference_loss(case: Case, logits: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Hugging Face's loss for the case, written out independently of curvscope."""
    targets = case.targets if targets is None else targets
    if case.task == "causal-lm":
        logits, targets = logits[:, :-1], targets[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


_TRUTHS: dict[tuple, torch.Tensor] = {}


def dense_truth(case: Case, rows: slice | None = None, scale: float = 1.0) -> torch.Tensor:
    """The float64 Hessian of the reference loss (on ``rows`` of the batch, times ``scale``)."""
    key = (str(case.model), None if rows is None else (rows.start, rows.stop), scale)
    if key not in _TRUTHS:
        _TRUTHS[key] = _dense_truth(case, rows, scale)
    return _TRUTHS[key]


def _dense_truth(case: Case, rows: slice | None, scale: float) -> torch.Tensor:
    module = _double(case.module)
    inputs = tuple(x if rows is None else x[rows] for x in case.inputs)
    targets = case.targets if rows is None else case.targets[rows]
    names = [name for name, _ in module.named_parameters()]
    params = [p.detach() for p in module.parameters()]
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]

    def loss(theta: torch.Tensor) -> torch.Tensor:
        values = {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        return reference_loss(case, torch.func.functional_call(module, values, inputs), targets) * scale

    return torch.autograd.functional.hessian(loss, torch.cat([p.reshape(-1) for p in params]))


def per_sequence_hessians(case: Case) -> list[torch.Tensor]:
    """H_i of every sequence, each scaled so that their mean is the batch Hessian: a sequence's
    token losses over the batch's counted tokens, times n (docs/sharpness.md)."""
    labels = case.targets[:, 1:] if case.task == "causal-lm" else case.targets
    counted = int((labels != -100).sum()) if labels.dim() == 2 else SAMPLES
    hessians = []
    for i in range(SAMPLES):
        own = int((labels[i] != -100).sum()) if labels.dim() == 2 else 1
        hessians.append(dense_truth(case, slice(i, i + 1), scale=SAMPLES * own / counted) if own else None)
    return [h if h is not None else torch.zeros_like(hessians[0]) for h in hessians]


def _double(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module).double()
