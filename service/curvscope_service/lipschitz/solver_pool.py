"""A pool of SDP solver subprocesses with a wall-time and a memory cap.

cvxpy and its solvers never run in the server's process: a solve that runs away in time or
memory, or a solver that crashes, takes down only its worker. Workers are fresh interpreters (not forked
from a threaded server), import cvxpy once and stay warm between solves; a worker is killed
when its solve passes the time cap, when the request is cancelled (``check`` raises), or when
it dies, and a fresh one is started for the next solve.
"""

from __future__ import annotations

import atexit
import select
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from ..errors import DeadlineExceeded, ResourceExhausted
from .solver_worker import read_message, write_message

DEFAULT_TIME_LIMIT_S = 300.0
DEFAULT_MEMORY_LIMIT_MIB = 4096
POLL_S = 0.05


class _Worker:
    def __init__(self, memory_limit_mib: int) -> None:
        # A fresh interpreter on a module, not multiprocessing: nothing of the server's
        # process (threads, the caller's __main__) is copied or re-imported.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "curvscope_service.lipschitz.solver_worker", str(memory_limit_mib)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        self.memory_limit_mib = memory_limit_mib
        self.ready = False

    def send(self, value: Any) -> None:
        write_message(self.process.stdin, value)

    def poll(self, timeout: float) -> bool:
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        return bool(readable)

    def receive(self) -> Any:
        return read_message(self.process.stdout)

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait(timeout=10)
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


class SolverPool:
    """At most ``size`` solver processes; ``solve`` blocks for a free one."""

    def __init__(self, size: int = 1, memory_limit_mib: int = DEFAULT_MEMORY_LIMIT_MIB) -> None:
        self.size = size
        self.memory_limit_mib = memory_limit_mib
        self._idle: list[_Worker] = []
        self._busy = 0
        self._lock = threading.Condition()

    def solve(
        self, problem: dict[str, Any], *, time_limit_s: float = DEFAULT_TIME_LIMIT_S,
        memory_limit_mib: int | None = None, check: Callable[[], None] | None = None, what: str = "the SDP",
    ) -> dict[str, Any]:
        """The worker's answer, or DeadlineExceeded / ResourceExhausted; ``check`` may raise to cancel."""
        memory = memory_limit_mib or self.memory_limit_mib
        worker = self._acquire(memory, check)
        started = time.monotonic()
        healthy = False
        try:
            if not worker.ready:
                self._wait(worker, started, time_limit_s, check, what, memory)  # the import of cvxpy
                worker.ready = True
            worker.send(problem)
            result = self._wait(worker, started, time_limit_s, check, what, memory)
            if result.get("status") == "memory":
                raise ResourceExhausted(f"{what} needs more than the memory cap of {memory} MiB; use network splitting (split_size)")
            healthy = True
            return result
        finally:
            self._release(worker, healthy)

    @staticmethod
    def _wait(worker: _Worker, started: float, time_limit_s: float, check: Callable[[], None] | None,
              what: str, memory: int) -> Any:
        while not worker.poll(POLL_S):
            if check is not None:
                check()
            if not worker.alive():
                break
            if time.monotonic() - started > time_limit_s:
                raise DeadlineExceeded(
                    f"{what} did not finish within its time cap of {time_limit_s:g} s; raise time_limit_seconds "
                    f"or use network splitting (split_size)")
        message = worker.receive() if worker.alive() or worker.poll(0) else None
        if message is None:
            raise ResourceExhausted(
                f"{what} stopped its solver process (exit code {worker.process.poll()}), most likely over the memory "
                f"cap of {memory} MiB; use network splitting (split_size) for a net this large")
        return message

    def _acquire(self, memory_limit_mib: int, check: Callable[[], None] | None) -> _Worker:
        with self._lock:
            while self._busy >= self.size:
                self._lock.wait(POLL_S)
                if check is not None:
                    check()
            self._busy += 1
            worker = next((w for w in self._idle if w.memory_limit_mib == memory_limit_mib), None)
            if worker is not None:
                self._idle.remove(worker)
                return worker
        try:
            return _Worker(memory_limit_mib)
        except BaseException:
            with self._lock:
                self._busy -= 1
                self._lock.notify()
            raise

    def _release(self, worker: _Worker, healthy: bool) -> None:
        if not healthy:
            worker.kill()
        with self._lock:
            self._busy -= 1
            if healthy:
                self._idle.append(worker)
                while len(self._idle) > self.size:
                    self._idle.pop(0).kill()
            self._lock.notify()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.kill()

    @property
    def processes(self) -> list[int]:
        """Process ids of the idle workers (for tests and metrics)."""
        with self._lock:
            return [w.process.pid for w in self._idle]


_default: SolverPool | None = None
_default_lock = threading.Lock()


def default_pool() -> SolverPool:
    """The process-wide pool, created on first use and closed at exit."""
    global _default
    with _default_lock:
        if _default is None:
            _default = SolverPool()
            atexit.register(_default.close)
        return _default
