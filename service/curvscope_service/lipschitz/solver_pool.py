"""A pool of SDP solver subprocesses with a wall-time and a memory cap.

cvxpy and its solvers never run in the server's process: a solve that runs away in time or
memory, or a solver that crashes, takes down only its worker. Workers are fresh interpreters (not forked
from a threaded server), import cvxpy once and stay warm between solves; a worker is killed
when its solve passes the time cap, when the request is cancelled (``check`` raises), or when
it dies, and a fresh one is started for the next solve. A worker killed from outside (SIGKILL
by an operator or the out-of-memory killer) ends its solve with ``Aborted``.

Live workers are counted in ``curvscope_solver_processes`` (busy / idle) and every solve in
``curvscope_solves`` by outcome.
"""

from __future__ import annotations

import atexit
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from .. import metrics
from ..errors import Aborted, DeadlineExceeded, ResourceExhausted
from .solver_worker import read_message, write_message

# Enough for a net of about 1,000 hidden neurons solved whole on one core (4-7 minutes measured).
DEFAULT_TIME_LIMIT_S = 900.0
DEFAULT_MEMORY_LIMIT_MIB = 4096
POLL_S = 0.05
# Signals that come from outside the solver (an operator, the OOM killer, a supervisor), as
# opposed to a crash of the solver itself; the memory cap (RLIMIT_AS) never sends one.
_EXTERNAL_SIGNALS = {signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT}


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
        self.state: str | None = None
        self.set_state("busy")

    def set_state(self, state: str | None) -> None:
        """busy, idle or None (dead): kept in step with the solver-process gauge."""
        if self.state is not None:
            metrics.SOLVER_PROCESSES.labels(self.state).dec()
        if state is not None:
            metrics.SOLVER_PROCESSES.labels(state).inc()
        self.state = state

    def send(self, value: Any) -> None:
        write_message(self.process.stdin, value)

    def poll(self, timeout: float) -> bool:
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        return bool(readable)

    def receive(self) -> Any:
        return read_message(self.process.stdout)

    def alive(self) -> bool:
        return self.process.poll() is None

    def exit_code(self) -> int | None:
        """The exit status once the process is gone (waits briefly: its pipe may close first)."""
        try:
            return self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait(timeout=10)
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self.set_state(None)


class SolverPool:
    """At most ``size`` solver processes; ``solve`` blocks for a free one."""

    def __init__(self, size: int = 1, memory_limit_mib: int = DEFAULT_MEMORY_LIMIT_MIB) -> None:
        self.size = size
        self.memory_limit_mib = memory_limit_mib
        self._idle: list[_Worker] = []
        self._busy = 0
        self._live: set[_Worker] = set()
        self._lock = threading.Condition()

    def solve(
        self, problem: dict[str, Any], *, time_limit_s: float = DEFAULT_TIME_LIMIT_S,
        memory_limit_mib: int | None = None, check: Callable[[], None] | None = None, what: str = "the SDP",
    ) -> dict[str, Any]:
        """The worker's answer, or DeadlineExceeded / ResourceExhausted / Aborted; ``check`` may
        raise to cancel."""
        memory = memory_limit_mib or self.memory_limit_mib
        worker = self._acquire(memory, check)
        started = time.monotonic()
        healthy = False
        outcome = ["failed"]
        try:
            if not worker.ready:
                self._wait(worker, started, time_limit_s, check, what, memory, outcome)  # the import of cvxpy
                worker.ready = True
            try:
                worker.send(problem)
            except OSError:
                pass  # the worker died since its last solve: _wait says how
            result = self._wait(worker, started, time_limit_s, check, what, memory, outcome)
            if result.get("status") == "memory":
                outcome[0] = "memory"
                raise ResourceExhausted(f"{what} needs more than the memory cap of {memory} MiB; use network splitting (split_size)")
            healthy = True
            outcome[0] = "ok"
            return result
        finally:
            # released (its process gauge updated) before the solve is counted, so a reader who
            # sees the count also sees the worker gone
            try:
                self._release(worker, healthy)
            finally:
                metrics.SOLVES.labels(outcome[0]).inc()

    @staticmethod
    def _wait(worker: _Worker, started: float, time_limit_s: float, check: Callable[[], None] | None,
              what: str, memory: int, outcome: list[str]) -> Any:
        while not worker.poll(POLL_S):
            if check is not None:
                outcome[0] = "cancelled"
                check()
                outcome[0] = "failed"
            if not worker.alive():
                break
            if time.monotonic() - started > time_limit_s:
                outcome[0] = "time_cap"
                raise DeadlineExceeded(
                    f"{what} did not finish within its time cap of {time_limit_s:g} s; raise time_limit_seconds "
                    f"or use network splitting (split_size)")
        message = worker.receive() if worker.alive() or worker.poll(0) else None
        if message is not None:
            return message
        code = worker.exit_code()
        if code is not None and code < 0 and -code in _EXTERNAL_SIGNALS:
            outcome[0] = "killed"
            raise Aborted(
                f"the solver process of {what} was killed by {signal.Signals(-code).name} mid-solve, from outside "
                f"the server (an operator, or the node's out-of-memory killer); the server is unharmed and starts "
                f"a fresh solver process: retry the request, and if it recurs lower memory_limit_mib below the "
                f"pod's memory limit or use network splitting (split_size)")
        outcome[0] = "memory"
        raise ResourceExhausted(
            f"{what} stopped its solver process (exit code {code}), most likely over the memory "
            f"cap of {memory} MiB; use network splitting (split_size) for a net this large")

    def _acquire(self, memory_limit_mib: int, check: Callable[[], None] | None) -> _Worker:
        with self._lock:
            while self._busy >= self.size:
                self._lock.wait(POLL_S)
                if check is not None:
                    check()
            self._busy += 1
            # A warm worker killed while it waited is dropped, not handed a problem.
            for dead in [w for w in self._idle if not w.alive()]:
                self._idle.remove(dead)
                self._live.discard(dead)
                dead.kill()
            worker = next((w for w in self._idle if w.memory_limit_mib == memory_limit_mib), None)
            if worker is not None:
                self._idle.remove(worker)
                worker.set_state("busy")
                return worker
        try:
            worker = _Worker(memory_limit_mib)
            with self._lock:
                self._live.add(worker)
            return worker
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
            if not healthy:
                self._live.discard(worker)
            if healthy:
                worker.set_state("idle")
                self._idle.append(worker)
                while len(self._idle) > self.size:
                    extra = self._idle.pop(0)
                    self._live.discard(extra)
                    extra.kill()
            self._lock.notify()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
            self._live.difference_update(idle)
        for worker in idle:
            worker.kill()

    @property
    def processes(self) -> list[int]:
        """Process ids of the live workers, idle and busy (for tests)."""
        with self._lock:
            return sorted(w.process.pid for w in self._live)


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
