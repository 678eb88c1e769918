"""Scheduler: one job at a time per device, queue positions, bounded queue, cancellation."""

import asyncio
import threading
import time

import pytest

from curvscope_service.errors import Cancelled, DeadlineExceeded, ResourceExhausted
from curvscope_service.scheduler import Scheduler


def _blocking_work(release: threading.Event, log: list):
    def work(device, progress, check):
        log.append(("start", device))
        while not release.is_set():
            check()
            time.sleep(0.005)
        progress({"step": 1})
        return "result"
    return work


async def _drain(job):
    events = []
    while True:
        event = await asyncio.wait_for(job.events.get(), 10)
        events.append(event)
        if event.kind in ("done", "error"):
            return events


def test_jobs_run_one_at_a_time_and_positions_are_announced():
    async def scenario():
        scheduler = Scheduler(["cpu"], max_queue_depth=4)
        release, log = threading.Event(), []
        first = scheduler.submit(_blocking_work(release, log))
        second = scheduler.submit(_blocking_work(release, log))
        await asyncio.sleep(0.1)
        assert log == [("start", "cpu")]  # the second waits
        release.set()
        first_events, second_events = await _drain(first), await _drain(second)
        scheduler.stop(5)
        return first_events, second_events

    first_events, second_events = asyncio.run(scenario())
    assert first_events[0].kind == "queued" and first_events[0].payload == 0
    assert [e.kind for e in first_events][-2:] == ["progress", "done"]
    positions = [e.payload for e in second_events if e.kind == "queued"]
    assert positions[0] == 1 and positions[-1] == 0
    assert second_events[-1].payload == "result"


def test_full_queue_is_resource_exhausted():
    async def scenario():
        scheduler = Scheduler(["cpu"], max_queue_depth=1)
        release = threading.Event()
        scheduler.submit(_blocking_work(release, []))
        await asyncio.sleep(0.05)  # the first is running, the queue is empty again
        scheduler.submit(_blocking_work(release, []))
        with pytest.raises(ResourceExhausted, match="full"):
            scheduler.submit(_blocking_work(release, []))
        release.set()
        scheduler.stop(5)

    asyncio.run(scenario())


def test_cancel_stops_running_work_between_checks():
    stopped = []

    def work(device, progress, check):
        try:
            while True:
                check()
                time.sleep(0.005)
        except Cancelled as error:
            stopped.append(error)
            raise

    async def scenario():
        scheduler = Scheduler(["cpu"], max_queue_depth=2)
        ticket = scheduler.submit(work)
        await asyncio.sleep(0.05)
        ticket.cancel()  # the only caller went away
        for _ in range(200):
            if stopped:
                break
            await asyncio.sleep(0.01)
        scheduler.stop(5)

    asyncio.run(scenario())
    assert len(stopped) == 1


def test_deadline_stops_work():
    async def scenario():
        scheduler = Scheduler(["cpu"], max_queue_depth=2)
        job = scheduler.submit(_blocking_work(threading.Event(), []), timeout=0.1)
        events = await _drain(job)
        scheduler.stop(5)
        return events

    assert isinstance(asyncio.run(scenario())[-1].payload, DeadlineExceeded)


def test_jobs_spread_over_devices():
    async def scenario():
        scheduler = Scheduler(["cpu", "cpu-b"], max_queue_depth=2)
        release, log = threading.Event(), []
        jobs = [scheduler.submit(_blocking_work(release, log)) for _ in range(2)]
        await asyncio.sleep(0.1)
        release.set()
        for job in jobs:
            await _drain(job)
        scheduler.stop(5)
        return log

    assert sorted(device for _, device in asyncio.run(scenario())) == ["cpu", "cpu-b"]
