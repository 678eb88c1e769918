"""Helpers of the hostile-input tests: safetensors files written byte by byte, and a child process
that loads one and reports how far its peak memory grew."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

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
