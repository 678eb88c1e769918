"""Load each new input once in a memory-capped child process before the server loads it.

Every reader in ``loading`` caps what a file declares before allocating it, but a reader is code,
and a variant nobody has shown us may still inflate, recurse or crash in a library. So the server
first loads an input it has not seen in a fresh interpreter with an address-space limit
(RLIMIT_AS) and a wall-time limit: a hostile file that gets past the caps takes down that child,
never the serving process. Only an input the child loaded cleanly is then loaded by the server,
from the same immutable bytes with the same code; the verdict is kept per file, so a blob
analysed many times is vetted once.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curvscope_service.errors import CurvscopeError, InvalidInput, NotFound, PermissionDenied, ResourceExhausted, Unimplemented

# What a child needs for the interpreter, torch and the model's own tensors: a fixed part
# (python + torch mapped ~0.75 GB of address space, measured) and a multiple of the file (the
# bytes read once, the tensors built from them, and the module they are copied into).
BASE_MEMORY_MIB = 2048
MEMORY_PER_FILE_BYTE = 4
DEFAULT_TIME_LIMIT_S = 300.0
_CACHE_SIZE = 1024
_EXIT_MEMORY = 3  # the child's MemoryError
_MiB = 1 << 20


@dataclass(frozen=True)
class _Verdict:
    ok: bool
    code: str = ""
    message: str = ""
    final: bool = True  # the same bytes give the same verdict; a timeout may not


_ERRORS: dict[str, type[CurvscopeError]] = {
    cls.code: cls for cls in (InvalidInput, NotFound, PermissionDenied, ResourceExhausted, Unimplemented)
}


class Vetter:
    """``check_model`` / ``check_data`` raise what loading the file would raise, without the risk."""

    def __init__(self, *, base_memory_mib: int = BASE_MEMORY_MIB, time_limit_s: float = DEFAULT_TIME_LIMIT_S) -> None:
        self.base_memory_mib = base_memory_mib
        self.time_limit_s = time_limit_s
        self._verdicts: OrderedDict[tuple, _Verdict] = OrderedDict()
        self._lock = threading.Lock()
        self.children_started = 0  # for tests and metrics: a cached verdict starts none

    def check_model(
        self, path: Path, *, model_format: str = "auto", architecture: str | None = None, architecture_config: dict | None = None
    ) -> None:
        self._check({"kind": "model", "path": str(path), "format": model_format, "architecture": architecture, "config": architecture_config})

    def check_data(self, path: Path) -> None:
        self._check({"kind": "data", "path": str(path)})

    def _check(self, request: dict[str, Any]) -> None:
        stat = os.stat(request["path"])
        key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, json.dumps(request, sort_keys=True))
        with self._lock:
            verdict = self._verdicts.get(key)
            if verdict is not None:
                self._verdicts.move_to_end(key)
        if verdict is None:
            verdict = self._run_child(request, memory_mib=self.base_memory_mib + MEMORY_PER_FILE_BYTE * stat.st_size // _MiB)
            if verdict.final:
                with self._lock:
                    self._verdicts[key] = verdict
                    while len(self._verdicts) > _CACHE_SIZE:
                        self._verdicts.popitem(last=False)
        if not verdict.ok:
            raise _ERRORS.get(verdict.code, InvalidInput)(verdict.message)

    def _run_child(self, request: dict[str, Any], *, memory_mib: int) -> _Verdict:
        self.children_started += 1
        what = "model" if request["kind"] == "model" else "data batch"
        try:
            done = subprocess.run(
                # a fresh interpreter on a module (no fork of a threaded server); it caps itself first
                [sys.executable, "-m", "curvscope_service.loading.vetting", str(memory_mib)],
                input=json.dumps(request).encode(), capture_output=True, timeout=self.time_limit_s,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
        except subprocess.TimeoutExpired:
            return _Verdict(
                False, "RESOURCE_EXHAUSTED", f"loading the {what} took longer than {self.time_limit_s:.0f} s; it was stopped", final=False
            )
        if done.returncode == 0:
            try:
                answer = json.loads(done.stdout.decode().strip().splitlines()[-1])
                return _Verdict(bool(answer["ok"]), str(answer.get("code", "")), str(answer.get("message", "")))
            except (ValueError, KeyError, IndexError, TypeError):
                pass
        if done.returncode == _EXIT_MEMORY:
            return _Verdict(False, "RESOURCE_EXHAUSTED", f"loading the {what} needs more than {memory_mib} MiB; refused")
        # killed by a signal (a crash in a library, or the address-space cap hit in C code)
        return _Verdict(
            False, "INVALID_ARGUMENT",
            f"the {what} could not be read: its reader stopped abnormally (exit {done.returncode}) within a {memory_mib} MiB cap",
        )


def _child(memory_mib: int) -> int:
    """The child: cap its address space, load what stdin names, print one JSON verdict line."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_mib * _MiB, memory_mib * _MiB))
    import torch

    from curvscope_service.loading import load_data, load_model
    from curvscope_service.loading.messages import one_line

    torch.set_num_threads(1)
    request = json.loads(sys.stdin.read())
    try:
        if request["kind"] == "model":
            load_model(Path(request["path"]), format=request["format"], architecture=request["architecture"], config=request["config"])
        else:
            load_data(Path(request["path"]))
        answer: dict[str, Any] = {"ok": True}
    except CurvscopeError as e:
        answer = {"ok": False, "code": e.code, "message": str(e)}
    except MemoryError:
        return _EXIT_MEMORY
    except Exception as e:  # a reader's bug, not the server's: the file is refused, with the reason
        answer = {"ok": False, "code": "INVALID_ARGUMENT", "message": f"the file could not be read ({one_line(e)})"}
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(_child(int(sys.argv[1])))
