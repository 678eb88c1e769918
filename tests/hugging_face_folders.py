"""Tiny Hugging Face models (a few thousand parameters) built from transformers configs in the
tests, written as checkpoint folders by transformers' own save_pretrained, and token batches.

The tests trust these files (they wrote them); the service under test reads them with its own
readers only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from curvscope_service.loading.hugging_face import import_transformers

VOCAB = 20
POSITIONS = 12
NO_DROPOUT_BERT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
NO_DROPOUT_GPT2 = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
# class name -> its config class and settings
TINY = {
    "BertForSequenceClassification": ("BertConfig", {
        "vocab_size": VOCAB, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 16, "max_position_embeddings": POSITIONS, "num_labels": 3, **NO_DROPOUT_BERT}),
    "BertForTokenClassification": ("BertConfig", {
        "vocab_size": VOCAB, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 16, "max_position_embeddings": POSITIONS, "num_labels": 4, **NO_DROPOUT_BERT}),
    "GPT2LMHeadModel": ("GPT2Config", {
        "vocab_size": VOCAB, "n_positions": POSITIONS, "n_embd": 8, "n_layer": 2, "n_head": 2,
        "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, **NO_DROPOUT_GPT2}),
    "GPT2ForSequenceClassification": ("GPT2Config", {
        "vocab_size": VOCAB, "n_positions": POSITIONS, "n_embd": 8, "n_layer": 1, "n_head": 2, "num_labels": 2,
        "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, **NO_DROPOUT_GPT2}),
    "LlamaForCausalLM": ("LlamaConfig", {
        "vocab_size": VOCAB, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "intermediate_size": 16, "max_position_embeddings": POSITIONS,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}),
}


def tiny_model(architecture: str, *, seed: int = 0, **overrides) -> nn.Module:
    """The transformers model itself (eval mode, eager attention), randomly initialised by seed."""
    transformers = import_transformers()
    config_class, settings = TINY[architecture]
    config = getattr(transformers, config_class)(**{**settings, **overrides}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():  # biases and LayerNorm away from their initial 0 and 1: every term counts
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def save_folder(model: nn.Module, folder: Path, *, shard_bytes: int | None = None) -> Path:
    """``save_pretrained``'s folder (config.json, generation_config.json, model.safetensors or
    shards and their index)."""
    kwargs = {"max_shard_size": shard_bytes} if shard_bytes else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def token_batch(n: int = 6, length: int = 10, *, seed: int = 0, vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), int64: random tokens (never 0, the padding id) with the last
    rows padded on the right by 0 to 3 tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=generator)
    mask = torch.ones(n, length, dtype=torch.int64)
    for row in range(n):
        padded = row % 4
        if padded:
            mask[row, length - padded:] = 0
            ids[row, length - padded:] = 0
    return ids, mask
