"""Helpers for the loading tests: small models and surgery on .pt2 archives."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

REFERENCE = Path(__file__).resolve().parents[2] / "data"

CNN_CONFIG = {
    "input_shape": [1, 8, 8],
    "layers": [
        {"type": "conv2d", "in_channels": 1, "out_channels": 4, "kernel_size": 3, "padding": 1},
        {"type": "batchnorm2d", "num_features": 4},
        {"type": "relu"},
        {"type": "avg_pool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "dropout", "p": 0.1},
        {"type": "linear", "in_features": 64, "out_features": 10},
        {"type": "leaky_relu", "negative_slope": 0.1},
        {"type": "linear", "in_features": 10, "out_features": 3},
    ],
}


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()


def rewrite_archive(
    src: Path, dst: Path, *, replace: dict[str, bytes] | None = None, add: dict[str, bytes] | None = None, drop: set[str] | None = None
) -> Path:
    """Copy a .pt2 with members replaced, added or dropped; names are relative to the archive folder
    unless they start with '/', which puts them at the zip root."""
    replace, add, drop = replace or {}, add or {}, drop or set()
    with zipfile.ZipFile(src) as zin:
        root = zin.namelist()[0].split("/", 1)[0]
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
            for info in zin.infolist():
                relative = info.filename[len(root) + 1 :]
                if relative in drop:
                    continue
                zout.writestr(info.filename, replace.get(relative, zin.read(info.filename)))
            for name, payload in add.items():
                zout.writestr(name[1:] if name.startswith("/") else f"{root}/{name}", payload)
    return dst


def read_member(path: Path, relative: str) -> bytes:
    with zipfile.ZipFile(path) as zf:
        root = zf.namelist()[0].split("/", 1)[0]
        return zf.read(f"{root}/{relative}")


def read_json_member(path: Path, relative: str) -> dict:
    return json.loads(read_member(path, relative))


class _Marker:
    """Unpickling this creates ``path``: proof that code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil_pickle(marker: Path, protocol: int = pickle.DEFAULT_PROTOCOL) -> bytes:
    return pickle.dumps(_Marker(marker), protocol=protocol)
