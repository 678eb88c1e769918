"""Solver subprocesses: time and memory caps, cancellation, a worker killed from outside, the
solver-process metrics, and the caller unharmed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from curvscope_service.errors import Aborted, Cancelled, DeadlineExceeded, ResourceExhausted
from curvscope_service.lipschitz import lipsdp
from curvscope_service.lipschitz.solver_pool import SolverPool


@pytest.fixture(scope="module")
def pool():
    pool = SolverPool()
    yield pool
    pool.close()


def problem(hidden: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((hidden, 16)), rng.standard_normal((3, hidden))]
    return lipsdp.make_problem(weights, [0.0], [1.0], "neuron")


def small() -> tuple[dict, list[np.ndarray]]:
    rng = np.random.default_rng(1)
    weights = [rng.standard_normal((6, 3)), rng.standard_normal((2, 6))]
    return lipsdp.make_problem(weights, [0.0], [1.0], "neuron"), weights


def solves_fine(pool: SolverPool) -> None:
    prob, weights = small()
    result = pool.solve(prob)
    assert result["status"] == "optimal"
    assert lipsdp.certify(weights, [0.0], [1.0], result["lambdas"]).bound > 0


def test_over_its_time_cap_the_solve_is_stopped_and_the_pool_recovers(pool):
    solves_fine(pool)
    (before,) = pool.processes
    capped = _sample("curvscope_solves_total", outcome="time_cap")
    with pytest.raises(DeadlineExceeded, match="time cap of 0.5 s"):
        pool.solve(problem(400), time_limit_s=0.5)
    assert _sample("curvscope_solves_total", outcome="time_cap") == capped + 1
    with pytest.raises(ProcessLookupError):
        os.kill(before, 0)  # the worker was killed and reaped, not left solving
    solves_fine(pool)


def test_a_solve_that_raises_is_a_status_and_the_worker_stays(pool):
    solves_fine(pool)
    (before,) = pool.processes
    broken = {**small()[0], "alphas": []}  # no slope for the hidden layer: solve() raises IndexError
    result = pool.solve(broken)
    assert result["status"].startswith("solver_error: IndexError")
    assert pool.processes == [before]  # the same warm worker answers the next solve
    solves_fine(pool)


def test_over_its_memory_cap_the_solve_is_refused(pool):
    with pytest.raises(ResourceExhausted, match="memory cap of 520 MiB"):
        pool.solve(problem(400), memory_limit_mib=520)
    solves_fine(pool)


def _sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_cancel_kills_the_solve(pool):
    solves_fine(pool)
    calls, pids = [], []
    cancelled = _sample("curvscope_solves_total", outcome="cancelled")

    def check() -> None:
        calls.append(1)
        pids.extend(pool.processes)
        if len(calls) > 3:
            raise Cancelled("the client cancelled")

    with pytest.raises(Cancelled):
        pool.solve(problem(400), check=check)
    assert pids and all(_gone(pid) for pid in set(pids))  # killed and reaped, not left solving
    assert _sample("curvscope_solves_total", outcome="cancelled") == cancelled + 1
    solves_fine(pool)


def test_the_gauge_counts_solver_processes_while_they_live():
    busy, idle = (_sample("curvscope_solver_processes", state=s) for s in ("busy", "idle"))
    solves = _sample("curvscope_solves_total", outcome="ok")
    fresh = SolverPool()
    seen = []
    try:
        prob, _ = small()
        # check() runs while the worker starts and solves: the gauge counts it busy then.
        fresh.solve(prob, check=lambda: seen.append(_sample("curvscope_solver_processes", state="busy")))
        assert seen and set(seen) == {busy + 1}
        assert _sample("curvscope_solver_processes", state="busy") == busy
        assert _sample("curvscope_solver_processes", state="idle") == idle + 1  # warm for the next solve
        assert _sample("curvscope_solves_total", outcome="ok") == solves + 1
    finally:
        fresh.close()
    assert _sample("curvscope_solver_processes", state="idle") == idle
    assert _sample("curvscope_solver_processes", state="busy") == busy


def test_a_worker_killed_mid_solve_aborts_cleanly_and_the_pool_recovers(pool):
    solves_fine(pool)  # a warm worker: the problem is sent at once, so the kill lands mid-solve
    killed = _sample("curvscope_solves_total", outcome="killed")
    busy = _sample("curvscope_solver_processes", state="busy")
    victims = []

    def kill_the_worker() -> None:
        if not victims:
            victims.extend(pool.processes)
            os.kill(victims[0], signal.SIGKILL)

    with pytest.raises(Aborted, match="killed by SIGKILL mid-solve.*retry the request"):
        pool.solve(problem(400), check=kill_the_worker)
    assert len(victims) == 1 and _gone(victims[0])
    assert pool.processes == []
    assert _sample("curvscope_solves_total", outcome="killed") == killed + 1
    assert _sample("curvscope_solver_processes", state="busy") == busy
    solves_fine(pool)


def test_a_warm_worker_killed_between_solves_is_replaced(pool):
    solves_fine(pool)
    (before,) = pool.processes
    os.kill(before, signal.SIGKILL)
    tasks = Path(f"/proc/{before}/task")
    for _ in range(1000):  # until every thread has exited (a zombie the pool has not reaped yet)
        if _state(before) == "Z" and len(list(tasks.iterdir())) == 1:
            break
        time.sleep(0.01)
    solves_fine(pool)  # the dead worker is dropped, a fresh one solves
    assert pool.processes and before not in pool.processes
