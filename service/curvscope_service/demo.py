"""``curvscope demo``: a small MLP trained on scikit-learn's digits (real data shipped with the
package), served by an in-process server on a free loopback port, analysed through the client.

``curvscope demo --transformer``: a tiny GPT-2 trained for a few seconds on a text generated here
(short English sentences, a character-level vocabulary), written as a Hugging Face checkpoint
folder (config.json + model.safetensors), analysed as a causal language model the same way.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from curvscope import Client, Report
from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb

from .config import ServerConfig
from .loading import save_sequential
from .loading.hugging_face import import_transformers
from .in_process import InProcessServer

DEMO_CONFIG = {
    "input_shape": [64],
    "layers": [
        {"type": "linear", "in_features": 64, "out_features": 32},
        {"type": "tanh"},
        {"type": "linear", "in_features": 32, "out_features": 10},
    ],
}
DEMO_SAMPLES = 512


def write_demo_files(directory: Path, *, steps: int = 300, seed: int = 0) -> tuple[Path, Path]:
    """Train the demo MLP on the digits and write (model.safetensors, data.safetensors)."""
    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    targets = torch.tensor(digits.target, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(inputs), generator=generator)
    inputs, targets = inputs[order[:DEMO_SAMPLES]], targets[order[:DEMO_SAMPLES]]

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()

    model_path, data_path = directory / "digits-mlp.safetensors", directory / "digits-512.safetensors"
    save_sequential(model_path, DEMO_CONFIG, model.state_dict())
    save_file({"inputs": inputs.contiguous(), "targets": targets.contiguous()}, str(data_path))
    return model_path, data_path


_SUBJECTS = ("the cat", "a dog", "the old man", "my sister", "the teacher", "a small bird", "the farmer",
             "our neighbour")
_VERBS = ("sees", "likes", "follows", "finds", "helps", "calls", "watches", "meets")
_OBJECTS = ("the river", "a red ball", "the children", "an apple", "the green door", "a quiet house",
            "the night sky", "her friend")
_ENDINGS = ("", " today", " at noon", " again", " in the garden", " every morning")
TEXT_SENTENCES = 512
TEXT_LENGTH = 56  # characters per sample: the longest sentence (50) and its full stop fit
PAD = "\0"  # token 0: padding, masked out


def demo_text(sentences: int = TEXT_SENTENCES, *, seed: int = 0) -> list[str]:
    """Short English sentences from a small grammar, the same for a seed on every machine."""
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}."
            for _ in range(sentences)]


def _tokens(sentences: list[str]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The character vocabulary (padding first), token ids (n, TEXT_LENGTH) and the attention mask."""
    vocabulary = [PAD, *sorted({c for sentence in sentences for c in sentence})]
    index = {c: i for i, c in enumerate(vocabulary)}
    ids = torch.zeros(len(sentences), TEXT_LENGTH, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, sentence in enumerate(sentences):
        ids[row, :len(sentence)] = torch.tensor([index[c] for c in sentence])
        mask[row, :len(sentence)] = 1
    return vocabulary, ids, mask


def write_transformer_demo_files(directory: Path, *, steps: int = 120, samples: int = 32,
                                 seed: int = 0) -> tuple[Path, Path]:
    """Train a tiny GPT-2 (about 30,000 parameters) on the demo text and write (the checkpoint
    folder, data.safetensors with input_ids and attention_mask of ``samples`` held-out sentences)."""
    transformers = import_transformers()
    sentences = demo_text(TEXT_SENTENCES + samples, seed=seed)
    vocabulary, ids, mask = _tokens(sentences)
    labels = ids.masked_fill(mask == 0, -100)  # padding is never predicted
    train = slice(0, TEXT_SENTENCES)
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=len(vocabulary), n_positions=TEXT_LENGTH, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(0, TEXT_SENTENCES, (32,), generator=generator)
        optimizer.zero_grad()
        model(input_ids=ids[train][batch], attention_mask=mask[train][batch], labels=labels[train][batch]).loss.backward()
        optimizer.step()

    folder = directory / "tiny-gpt2"
    folder.mkdir()
    written = {**model.config.to_dict(), "architectures": ["GPT2LMHeadModel"]}
    (folder / "config.json").write_text(json.dumps(written, indent=2) + "\n")
    # lm_head.weight is tied to transformer.wte.weight: stored once, as save_pretrained does
    weights = {name: tensor.contiguous() for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    data_path = directory / "sentences.safetensors"
    held_out = slice(TEXT_SENTENCES, TEXT_SENTENCES + samples)
    save_file({"input_ids": ids[held_out].contiguous(), "attention_mask": mask[held_out].contiguous()}, str(data_path))
    return folder, data_path


def run_demo(*, progress: Callable[[pb.AnalyzeEvent], None] | None = None, per_layer: bool = True,
             transformer: bool = False) -> Report:
    with tempfile.TemporaryDirectory(prefix="curvscope-demo-") as tmp:
        directory = Path(tmp)
        if transformer:
            model_path, data_path = write_transformer_demo_files(directory)
            options = {"task": "causal-lm"}
        else:
            model_path, data_path = write_demo_files(directory)
            options = {}
        with InProcessServer(ServerConfig(store=directory / "store")) as server:
            with Client(server.target) as client:
                return client.analyze(model_path, data_path, eigen=5, smallest=2, per_layer=per_layer,
                                      progress=progress, **options)
