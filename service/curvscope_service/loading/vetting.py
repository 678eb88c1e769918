"""Load each new input once in a memory-capped child process before the server loads it.

Every reader in ``loading`` caps what a file declares before allocating it, but a reader is code,
and a variant nobody has shown us may still inflate, recurse or crash in a library. So the server
first loads an input it has not seen in a fresh interpreter with an address-space limit
(RLIMIT_AS) and a wall-time limit: a hostile file that gets past the caps takes down that child,
never the serving process. Only an input the child loaded cleanly is then loaded by the server,
from the same immutable bytes with the same code; the verdict is kept per file, so a blob
analysed many times is vetted once. The child is started with the server and imports the
readers once; it serves checks one at a time while files load cleanly, and is replaced after any
file it refused, crashed on or timed out on, so no state of a hostile load carries over.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import select
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
_EXIT_MEMORY = 3  # the child ran out of its memory cap (MemoryError, or SystemError from C code)
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
        self._verdicts_lock = threading.Lock()
        self._child_lock = threading.Lock()  # one check at a time in the child
        self._child: subprocess.Popen | None = self._start_child()
        self.children_started = 1  # for tests
        atexit.register(self.close)

    def close(self) -> None:
        """End the child (the server's shutdown)."""
        with self._child_lock:
            self._discard_child()

    def check_model(
        self, path: Path, sha256: str, *, model_format: str = "auto", architecture: str | None = None,
        architecture_config: dict | None = None, max_parameters: int | None = None,
    ) -> None:
        """``sha256`` is the file's content digest: verdicts are kept per content and options."""
        self._check(sha256, {
            "kind": "model", "path": str(path), "format": model_format, "architecture": architecture,
            "config": architecture_config, "max_parameters": max_parameters,
        })

    def check_data(self, path: Path, sha256: str) -> None:
        self._check(sha256, {"kind": "data", "path": str(path)})

    def _check(self, sha256: str, request: dict[str, Any]) -> None:
        size = _size(Path(request["path"]))
        key = (sha256, json.dumps({**request, "path": None}, sort_keys=True))
        with self._verdicts_lock:
            verdict = self._verdicts.get(key)
            if verdict is not None:
                self._verdicts.move_to_end(key)
        if verdict is None:
            with self._child_lock:
                verdict = self._ask_child({**request, "memory_mib": self.base_memory_mib + MEMORY_PER_FILE_BYTE * size // _MiB})
            if verdict.final:
                with self._verdicts_lock:
                    self._verdicts[key] = verdict
                    while len(self._verdicts) > _CACHE_SIZE:
                        self._verdicts.popitem(last=False)
        if not verdict.ok:
            raise _ERRORS.get(verdict.code, InvalidInput)(verdict.message)

    @staticmethod
    def _start_child() -> subprocess.Popen:
        # a fresh interpreter on a module, not a fork of a threaded server
        return subprocess.Popen(
            [sys.executable, "-m", "curvscope_service.loading.vetting"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    def _discard_child(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            child.kill()
            child.wait()
            for stream in (child.stdin, child.stdout):
                stream.close()

    def _ask_child(self, request: dict[str, Any]) -> _Verdict:
        """One check in the child (called with the child lock held)."""
        memory_mib = request["memory_mib"]
        what = "model" if request["kind"] == "model" else "data batch"
        if self._child is None or self._child.poll() is not None:
            self._discard_child()
            self._child = self._start_child()
            self.children_started += 1
        child = self._child
        line = b""
        try:
            child.stdin.write(json.dumps(request).encode() + b"\n")
            child.stdin.flush()
            # the answer, or the child's end: waited for with the time limit
            if select.select([child.stdout], [], [], self.time_limit_s)[0]:
                line = child.stdout.readline()
            else:
                self._discard_child()
                return _Verdict(
                    False, "RESOURCE_EXHAUSTED", f"loading the {what} took longer than {self.time_limit_s:.0f} s; it was stopped",
                    final=False,
                )
        except (BrokenPipeError, OSError):
            pass
        try:
            answer = json.loads(line)
            verdict = _Verdict(bool(answer["ok"]), str(answer.get("code", "")), str(answer.get("message", "")))
        except (ValueError, KeyError, TypeError):
            verdict = None
        if verdict is not None and verdict.ok:
            return verdict
        # it read a file it refused or died on: replaced now, so the next check finds it warm
        self._discard_child()
        self._child = self._start_child()
        self.children_started += 1
        if verdict is not None:
            return verdict
        if child.returncode == _EXIT_MEMORY:
            return _Verdict(False, "RESOURCE_EXHAUSTED", f"loading the {what} needs more than {memory_mib} MiB; refused")
        # killed by a signal (a crash in a library, or the address-space cap hit in C code)
        return _Verdict(
            False, "INVALID_ARGUMENT",
            f"the {what} could not be read: its reader stopped abnormally (exit {child.returncode}) within a {memory_mib} MiB cap",
        )


def _size(path: Path) -> int:
    """Bytes of a file, or of the files of a checkpoint folder."""
    if path.is_dir():
        return sum(entry.stat().st_size for entry in os.scandir(path) if entry.is_file())
    return path.stat().st_size


def _child() -> int:
    """The child: import the readers once, then for each request line: cap the address space,
    load the file it names, answer one JSON line."""
    import torch

    from curvscope_service.loading import load_data, load_model
    from curvscope_service.loading.messages import one_line

    torch.set_num_threads(1)
    for line in sys.stdin:
        request = json.loads(line)
        # the soft limit only: the next request sets its own
        resource.setrlimit(resource.RLIMIT_AS, (request["memory_mib"] * _MiB, resource.RLIM_INFINITY))
        try:
            if request["kind"] == "model":
                load_model(
                    Path(request["path"]), format=request["format"], architecture=request["architecture"],
                    config=request["config"], max_parameters=request["max_parameters"],
                )
            else:
                load_data(Path(request["path"]))
            answer: dict[str, Any] = {"ok": True}
        except CurvscopeError as e:
            answer = {"ok": False, "code": e.code, "message": str(e)}
        except (MemoryError, SystemError):
            # under the address-space cap a failed allocation surfaces as MemoryError, or in C
            # code that does not set one as SystemError ("error return without exception set")
            return _EXIT_MEMORY
        except Exception as e:  # a reader's bug, not the server's: the file is refused, with the reason
            answer = {"ok": False, "code": "INVALID_ARGUMENT", "message": f"the file could not be read ({one_line(e)})"}
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child())
