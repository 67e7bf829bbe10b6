"""Stream threads started ahead and parked (migrated/migration/parkedthreads.py): real threads."""

from __future__ import annotations

import threading

from helpers import wait_for

from migrated.migration.parkedthreads import PARKED_NAME, ThreadPark


def _parked_ids() -> set[int]:
    return {t.native_id for t in threading.enumerate() if t.name == PARKED_NAME and t.native_id is not None}


def test_a_job_runs_in_a_parked_thread_under_its_name_and_the_thread_parks_again() -> None:
    park = ThreadPark(keep=2)
    before = _parked_ids()
    park.fill()
    wait_for(lambda: park.parked == 2, what="two threads parked")
    parked = _parked_ids() - before
    assert len(parked) == 2
    seen: list[tuple[str, int]] = []
    job = park.start(lambda: seen.append((threading.current_thread().name, threading.get_native_id())), "data-stream-7")
    job.join(10)
    assert not job.is_alive()
    assert seen and seen[0][0] == "data-stream-7" and seen[0][1] in parked  # no thread was started for it
    assert job.native_id == seen[0][1]
    wait_for(lambda: park.parked == 2, what="the thread parked again")
    assert threading.current_thread().name != "data-stream-7"


def test_jobs_beyond_the_parked_ones_get_fresh_threads_and_only_keep_stay() -> None:
    park = ThreadPark(keep=2)
    gate = threading.Event()
    ran = []
    lock = threading.Lock()

    def work() -> None:
        gate.wait(10)
        with lock:
            ran.append(threading.get_native_id())

    jobs = [park.start(work, f"data-recv-{i}") for i in range(6)]  # none parked: six fresh threads
    wait_for(lambda: all(job.native_id is not None for job in jobs), what="six jobs running")
    assert len({job.native_id for job in jobs}) == 6  # each its own thread: none waits for another's end
    gate.set()
    for job in jobs:
        job.join(10)
    assert len(ran) == 6
    wait_for(lambda: park.parked == 2, what="two left parked")
    assert park.parked == 2  # the other four ended


def test_a_job_that_raises_does_not_end_the_thread() -> None:
    park = ThreadPark(keep=1)
    park.fill()
    wait_for(lambda: park.parked == 1, what="one parked")

    def boom() -> None:
        raise RuntimeError("escaped its own handling")

    failed = park.start(boom, "data-stream-0")
    failed.join(10)
    assert not failed.is_alive()
    wait_for(lambda: park.parked == 1, what="the thread parked again")
    done = park.start(lambda: None, "data-stream-1")
    done.join(10)
    assert not done.is_alive() and done.native_id == failed.native_id
