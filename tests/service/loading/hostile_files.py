"""Helpers of the hostile-input tests: safetensors files written byte by byte, a child process
that loads one and reports how far its peak memory grew, and architecture plugins installed
through a real entry point."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

_CHILD = """
import json, resource, sys
import torch
from curvscope_service.errors import CurvscopeError
from curvscope_service.loading import load_data, load_model

# Cap the address space above what the imports took, so a regression that allocates what the
# file declares fails in this child instead of taking the test machine with it.
with open("/proc/self/status") as status:
    vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + {headroom}, vm + {headroom}))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
{body}
    outcome = "loaded"
except CurvscopeError as error:
    outcome = f"{{type(error).__name__}}: {{error}}"
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"outcome": outcome, "growth_mb": (peak - base) / 1024}}))
"""


def raw_safetensors(path: Path, header: dict | str | bytes, data: bytes = b"") -> Path:
    """Write ``header`` (a dict is JSON-encoded) and ``data`` as a safetensors file, unchecked."""
    if isinstance(header, dict):
        header = json.dumps(header)
    blob = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def peak_growth(body: str, *, headroom_mb: int = 1536, pythonpath: list[Path] = ()) -> dict:
    """Run ``body`` (``load_model``/``load_data`` and torch are imported) in a fresh interpreter.

    Returns ``{"outcome": "loaded" | "<ErrorClass>: <message>", "growth_mb": peak RSS growth}``.
    """
    code = _CHILD.format(headroom=headroom_mb << 20, body=textwrap.indent(textwrap.dedent(body), "    "))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), *sys.path])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def install_plugin(root: Path, module: str, source: str, entry_points: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """Install ``source`` as module ``module`` under ``root`` with ``entry_points`` (name -> target)
    in the ``curvscope.architectures`` group, and put ``root`` on sys.path; returns ``root``."""
    root.mkdir(exist_ok=True)
    (root / f"{module}.py").write_text(source)
    dist = root / f"{module}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (dist / "entry_points.txt").write_text("[curvscope.architectures]\n" + lines)
    monkeypatch.syspath_prepend(str(root))
    return root


def plugin_checkpoint(tmp_path: Path, module: str, cls: str, architecture: str, width: int = 3) -> tuple[Path, torch.nn.Module]:
    """A safetensors checkpoint of ``module.cls(width)`` naming ``architecture`` and ``{"width": width}``."""
    import importlib

    model = getattr(importlib.import_module(module), cls)(width)
    path = tmp_path / f"{architecture}.safetensors"
    save_file(model.state_dict(), str(path), metadata={"architecture": architecture, "config": json.dumps({"width": width})})
    return path, model
