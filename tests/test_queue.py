"""The job queue against a real PostgreSQL: coalescing, leases, retries with backoff, and
exclusive runs per key with many concurrent workers."""
from __future__ import annotations

import threading
import time

import pytest

from core.storage import schema
from core.storage.db import Database
from core.storage.queue import RECONCILE, ROLLUP, JobQueue


@pytest.fixture
def queue(database_url, db):
    schema.apply(db)
    database = Database(database_url, pool_size=8)
    yield JobQueue(database, lease_seconds=30)
    database.close()


def rows(db, queue=RECONCILE):
    return db.execute("SELECT key, state, attempts, payload, last_error, generation FROM filestore.jobs"
                      " WHERE queue = %s ORDER BY key", (queue,)).fetchall()


def test_a_burst_on_one_key_is_one_job_with_merged_payload(queue, db):
    for i in range(50):
        queue.enqueue(RECONCILE, "1:aa", {"n": i, **({"deep": True} if i == 3 else {})})
    queue.enqueue(ROLLUP, "1:aa", {"dir": 7})
    (key, state, attempts, payload, _, generation), = rows(db)
    assert (key, state, attempts, generation) == ("1:aa", "queued", 0, 50)
    assert payload == {"n": 49, "deep": True}
    assert len(rows(db, ROLLUP)) == 1  # queues are separate
    assert queue.stats()[RECONCILE]["depth"] == 1


def test_finish_deletes_unless_new_events_arrived_while_running(queue, db):
    queue.enqueue(RECONCILE, "k", {})
    job, = queue.claim(RECONCILE)
    assert queue.claim(RECONCILE) == []  # leased: nobody else gets it
    queue.enqueue(RECONCILE, "k", {"again": True})  # an event while it runs
    queue.finish(job)
    (_, state, attempts, payload, _, _), = rows(db)
    assert state == "queued" and attempts == 0 and payload["again"] is True
    job, = queue.claim(RECONCILE)
    queue.finish(job)
    assert rows(db) == []


def test_failures_back_off_keep_the_error_and_park_after_max_attempts(queue, db):
    queue.enqueue(RECONCILE, "k", {}, max_attempts=2)
    job, = queue.claim(RECONCILE)
    assert queue.fail(job, "EIO: disk on fire") is False
    (_, state, attempts, _, error, _), = rows(db)
    assert (state, attempts, error) == ("queued", 1, "EIO: disk on fire")
    assert queue.claim(RECONCILE) == []  # backing off
    assert db.execute("SELECT run_after > now() FROM filestore.jobs").fetchone()[0]
    db.execute("UPDATE filestore.jobs SET run_after = now()")
    job, = queue.claim(RECONCILE)
    assert job.attempts == 2
    assert queue.fail(job, "still broken") is True
    assert rows(db)[0][1] == "failed"
    assert queue.stats()[RECONCILE]["failed"] == 1
    queue.enqueue(RECONCILE, "k", {})  # a new event revives it with fresh attempts
    assert rows(db)[0][1:3] == ("queued", 0)


def test_an_expired_lease_is_taken_over_and_the_old_holder_cannot_finish(queue, db):
    queue.enqueue(RECONCILE, "k", {})
    dead, = queue.claim(RECONCILE)  # its worker "dies" here
    db.execute("UPDATE filestore.jobs SET leased_until = now() - interval '1 second'")
    other = JobQueue(queue.db, owner="other")
    taken, = other.claim(RECONCILE)
    assert taken.id == dead.id and taken.attempts == 2
    queue.finish(dead)  # a stale token changes nothing
    assert rows(db)[0][1] == "running"
    assert not queue.extend(dead) and other.extend(taken)
    other.finish(taken)
    assert rows(db) == []


def test_concurrent_workers_never_run_one_key_twice_at_once(queue, db):
    keys = [f"k{i}" for i in range(40)]
    running: set[str] = set()
    overlaps: list[str] = []
    runs: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def worker() -> None:
        q = JobQueue(queue.db, owner=threading.current_thread().name)
        while not stop.is_set():
            jobs = q.claim(RECONCILE, 2)
            if not jobs:
                time.sleep(0.005)
                continue
            for job in jobs:
                with lock:
                    if job.key in running:
                        overlaps.append(job.key)
                    running.add(job.key)
                    runs[job.key] = runs.get(job.key, 0) + 1
                time.sleep(0.002)
                with lock:
                    running.discard(job.key)
                q.finish(job)

    threads = [threading.Thread(target=worker, name=f"w{i}") for i in range(6)]
    for t in threads:
        t.start()
    # Producers keep re-enqueueing the same keys while workers run them.
    for round_ in range(5):
        queue.enqueue_many(RECONCILE, [(k, {"round": round_}) for k in keys])
        time.sleep(0.02)
    deadline = time.monotonic() + 30
    while db.execute("SELECT count(*) FROM filestore.jobs").fetchone()[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    assert overlaps == []
    assert set(runs) == set(keys)  # every key ran, none was lost
    assert db.execute("SELECT count(*) FROM filestore.jobs").fetchone()[0] == 0


def test_finishing_a_batch_keeps_the_jobs_that_got_new_events(queue, db):
    queue.enqueue_many(RECONCILE, [("a", {}), ("b", {}), ("c", {})])
    jobs = queue.claim(RECONCILE, 3)
    assert len(jobs) == 3
    queue.enqueue(RECONCILE, "b", {"later": True})
    queue.finish_many(jobs)
    assert [(key, state) for key, state, *_ in rows(db)] == [("b", "queued")]


def test_threads_asking_a_new_database_for_its_pool_at_once_share_one(database_url):
    """The pool is made at first use; workers starting together (as above) each made one, and
    the ones dropped were never closed: their connections stayed open until the garbage
    collector, in one case running in such a pool's own worker thread ("cannot join current
    thread", seen in CI)."""
    database = Database(database_url, pool_size=2)
    start = threading.Barrier(8)
    pools = []

    def first_use() -> None:
        start.wait()
        pools.append(database.pool)

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        database.close()
    assert len(pools) == 8 and len({id(p) for p in pools}) == 1
