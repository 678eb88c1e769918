"""Solver subprocesses: time and memory caps, cancellation, and the caller unharmed."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from curvscope_service.errors import Cancelled, DeadlineExceeded, ResourceExhausted
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
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="time cap of 0.5 s"):
        pool.solve(problem(400), time_limit_s=0.5)
    assert time.monotonic() - started < 5
    with pytest.raises(ProcessLookupError):
        os.kill(before, 0)  # the worker was killed, not left running
    solves_fine(pool)


def test_over_its_memory_cap_the_solve_is_refused(pool):
    with pytest.raises(ResourceExhausted, match="memory cap of 520 MiB"):
        pool.solve(problem(400), memory_limit_mib=520)
    solves_fine(pool)


def test_cancel_kills_the_solve(pool):
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) > 3:
            raise Cancelled("the client cancelled")

    with pytest.raises(Cancelled):
        pool.solve(problem(400), check=check)
    solves_fine(pool)
