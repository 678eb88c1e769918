"""Scheduler: several analyses at once per device when configured, shared jobs by key, an
abandoned job gives up its place in the queue, and a cap on the wall time of the work."""

import asyncio
import threading
import time

import pytest

from curvscope_service.errors import ResourceExhausted
from curvscope_service.scheduler import Scheduler


def _work(release: threading.Event, running: list, peak: list, calls: list):
    lock = threading.Lock()

    def work(device, progress, check):
        calls.append(device)
        with lock:
            running.append(1)
            peak.append(len(running))
        try:
            while not release.is_set():
                check()
                time.sleep(0.005)
        finally:
            with lock:
                running.pop()
        return len(calls)
    return work


# Bounds that only turn a hang into a failure; nothing here is timed.
HANG = 300


async def _final(ticket):
    while True:
        event = await asyncio.wait_for(ticket.events.get(), HANG)
        if event.kind in ("done", "error"):
            return event


async def _started(ticket) -> None:
    while (await asyncio.wait_for(ticket.events.get(), HANG)).kind != "started":
        pass


async def _until(condition) -> None:
    deadline = time.monotonic() + HANG
    while not condition():
        assert time.monotonic() < deadline, "hung"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("concurrency", [1, 3])
def test_concurrency_per_device(concurrency):
    async def scenario():
        scheduler = Scheduler(["cpu"], max_queue_depth=8, concurrency=concurrency)
        release, running, peak, calls = threading.Event(), [], [], []
        tickets = [scheduler.submit(_work(release, running, peak, calls)) for _ in range(5)]
        # Every worker thread is then inside a job that cannot end before the release: no other
        # job can start, however long we look (a short look, as a wrong count would show at once).
        await _until(lambda: len(calls) == concurrency)
        await asyncio.sleep(0.2)
        started = len(calls)
        release.set()
        for ticket in tickets:
            assert (await _final(ticket)).kind == "done"
        scheduler.stop(5)
        return started, max(peak)

    started, peak = asyncio.run(scenario())
    assert started == concurrency and peak == concurrency


def test_same_key_shares_one_job_until_it_ends():
    async def scenario():
        scheduler = Scheduler(["cpu"], max_queue_depth=8)
        release, calls, finished = threading.Event(), [], []
        work = _work(release, [], [], calls)
        first = scheduler.submit(work, key="k", on_finish=lambda: finished.append("first"))
        await asyncio.sleep(0.05)
        second = scheduler.submit(work, key="k", on_finish=lambda: finished.append("second"))
        assert second.job is first.job and finished == ["second"]  # a joiner holds nothing itself
        other = scheduler.submit(work, key="other")
        first.cancel()  # one of two callers leaves: the work goes on
        await asyncio.sleep(0.05)
        assert not second.job.cancelled.is_set()
        release.set()
        result = await _final(second)
        await _final(other)
        await asyncio.sleep(0.05)
        # Finished: the key is free again and a new request makes a new job.
        again = scheduler.submit(work, key="k")
        await _final(again)
        scheduler.stop(5)
        return result, calls, finished, again.job is not first.job

    result, calls, finished, fresh = asyncio.run(scenario())
    assert result.kind == "done" and len(calls) == 3 and finished == ["second", "first"] and fresh


def test_an_abandoned_job_leaves_the_queue():
    async def scenario():
        scheduler = Scheduler(["cpu"], max_queue_depth=1)
        release, calls, finished = threading.Event(), [], []
        running = scheduler.submit(_work(release, [], [], calls))
        await _started(running)  # out of the queue, which now holds one more
        waiting = scheduler.submit(_work(release, [], [], calls), on_finish=lambda: finished.append(1))
        with pytest.raises(ResourceExhausted):
            scheduler.submit(_work(release, [], [], calls))
        waiting.cancel()
        third = scheduler.submit(_work(release, [], [], calls))  # takes the abandoned place
        positions = [(await third.events.get()).payload]
        release.set()
        await _final(running)
        await _final(third)
        scheduler.stop(5)
        return calls, finished, positions

    calls, finished, positions = asyncio.run(scenario())
    assert len(calls) == 2 and finished == [1] and positions == [0]


def test_work_past_the_time_cap_is_stopped():
    async def scenario():
        scheduler = Scheduler(["cpu"], max_queue_depth=2, max_run_seconds=0.2)
        running, calls = [], []
        started = time.monotonic()
        # Never released: only the cap ends this work.
        event = await _final(scheduler.submit(_work(threading.Event(), running, [], calls)))
        scheduler.stop(5)
        return event, time.monotonic() - started, running, calls

    event, elapsed, running, calls = asyncio.run(scenario())
    assert isinstance(event.payload, ResourceExhausted) and "0.2 s" in str(event.payload)
    # Not before the cap, and the work itself ended (it left its loop), not just the caller's wait.
    assert elapsed >= 0.2 and len(calls) == 1 and running == []
