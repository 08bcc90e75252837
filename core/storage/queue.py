"""Durable job queues in PostgreSQL (docs/architecture.md, the queue decision).

A job is one row of `filestore.jobs`, unique per (queue, key):
- enqueue coalesces: a second event for a pending key merges its payload and keeps the
  earliest run time, so a burst of writes to one path is one job;
- claim takes ready rows with FOR UPDATE SKIP LOCKED and leases them (token + expiry), so
  several workers and several sidecars share the work and no key runs twice at once; a
  worker killed mid-job leaves a lease that expires, and the job is claimed again;
- finish deletes the row, unless its generation moved while it ran (new events came in),
  in which case it goes back to queued;
- fail records the error and re-queues it with exponential backoff, or parks it as failed
  after max_attempts (a new event for the key re-queues it).
Nothing is held in memory: a crash of the producer or the worker loses no enqueued job.
"""
from __future__ import annotations

import json
import os
import random
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from core.storage.db import Database

RECONCILE = "filestore_reconcile_queue"
ROLLUP = "filestore_rollup_queue"
QUEUES = (RECONCILE, ROLLUP)

BACKOFF_BASE = 1.0  # seconds; attempt n waits about BASE * 2**(n-1), capped
BACKOFF_CAP = 300.0


@dataclass(frozen=True, eq=False)  # identity: jobs go in sets while leased
class Job:
    id: int
    queue: str
    key: str
    payload: dict[str, Any]
    generation: int
    attempts: int
    max_attempts: int
    token: uuid.UUID


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JobQueue:
    def __init__(self, db: Database, *, lease_seconds: float | None = None, owner: str | None = None):
        self.db = db
        self.lease_seconds = lease_seconds or float(os.environ.get("FILESTORE_JOB_LEASE_SECONDS", "30"))
        self.owner = owner or worker_name()

    # -- producing ---------------------------------------------------------------------
    def enqueue(self, queue: str, key: str, payload: dict[str, Any] | None = None, *,
                delay: float = 0.0, max_attempts: int = 8) -> None:
        self.enqueue_many(queue, [(key, payload or {})], delay=delay, max_attempts=max_attempts)

    def enqueue_many(self, queue: str, items: list[tuple[str, dict[str, Any]]], *, delay: float = 0.0,
                     max_attempts: int = 8) -> None:
        """One statement for a batch of events; keys repeated in the batch are merged first."""
        merged: dict[str, dict[str, Any]] = {}
        for key, payload in items:
            merged.setdefault(key, {}).update(payload)
        if not merged:
            return
        rows = json.dumps([{"key": k, "payload": p} for k, p in sorted(merged.items())])
        # A pending job keeps its earlier run time (a steady stream of events must not postpone
        # it forever); a failed one is revived with fresh attempts, as the event is new information.
        self.db.query(
            "INSERT INTO filestore.jobs AS j (queue, key, payload, run_after, max_attempts)"
            " SELECT %s, r->>'key', r->'payload', now() + make_interval(secs => %s), %s"
            "   FROM jsonb_array_elements(%s::jsonb) AS r"
            " ON CONFLICT (queue, key) DO UPDATE SET"
            "   payload = j.payload || excluded.payload,"
            "   generation = j.generation + 1,"
            "   run_after = CASE WHEN j.state = 'failed' THEN excluded.run_after"
            "                    ELSE least(j.run_after, excluded.run_after) END,"
            "   attempts = CASE WHEN j.state = 'failed' THEN 0 ELSE j.attempts END,"
            "   state = CASE WHEN j.state = 'failed' THEN 'queued' ELSE j.state END"
            " RETURNING 1",
            (queue, delay, max_attempts, rows))

    # -- consuming ---------------------------------------------------------------------
    def claim(self, queue: str, limit: int = 1) -> list[Job]:
        token = uuid.uuid4()
        rows = self.db.query(
            "UPDATE filestore.jobs j SET state = 'running', attempts = j.attempts + 1, started_at = now(),"
            "       leased_until = now() + make_interval(secs => %s), leased_by = %s, lease_token = %s"
            "  FROM (SELECT id FROM filestore.jobs"
            "         WHERE queue = %s AND ((state = 'queued' AND run_after <= now())"
            "                               OR (state = 'running' AND leased_until < now()))"
            "         ORDER BY run_after LIMIT %s FOR UPDATE SKIP LOCKED) ready"
            " WHERE j.id = ready.id"
            " RETURNING j.id, j.queue, j.key, j.payload, j.generation, j.attempts, j.max_attempts",
            (self.lease_seconds, self.owner, token, queue, limit))
        return [Job(*row, token=token) for row in rows]

    def extend(self, job: Job) -> bool:
        """Keep the lease of a long job; False if it was lost (taken over after expiry)."""
        return bool(self.db.query(
            "UPDATE filestore.jobs SET leased_until = now() + make_interval(secs => %s)"
            " WHERE id = %s AND lease_token = %s AND state = 'running' RETURNING 1",
            (self.lease_seconds, job.id, job.token)))

    def finish(self, job: Job) -> None:
        # Events that arrived while it ran moved the generation: run it again (after the
        # debounce they already set), otherwise the job is done and goes away.
        self.db.query(
            "WITH gone AS (DELETE FROM filestore.jobs WHERE id = %(id)s AND lease_token = %(token)s"
            "              AND generation = %(gen)s RETURNING 1)"
            " UPDATE filestore.jobs SET state = 'queued', attempts = 0, leased_until = NULL, enqueued_at = now(),"
            "        leased_by = NULL, lease_token = NULL, last_error = NULL"
            "  WHERE id = %(id)s AND lease_token = %(token)s AND NOT EXISTS (SELECT 1 FROM gone)"
            " RETURNING 1",
            {"id": job.id, "token": job.token, "gen": job.generation})

    def finish_many(self, jobs: list[Job]) -> None:
        """finish() for a batch, in one statement (a worker's claim batch: two queries per batch)."""
        if not jobs:
            return
        self.db.query(
            "WITH done AS (SELECT * FROM unnest(%s::bigint[], %s::uuid[], %s::bigint[]) AS d(id, token, gen)),"
            " gone AS (DELETE FROM filestore.jobs j USING done WHERE j.id = done.id AND j.lease_token = done.token"
            "          AND j.generation = done.gen RETURNING j.id)"
            " UPDATE filestore.jobs j SET state = 'queued', attempts = 0, leased_until = NULL, enqueued_at = now(),"
            "        leased_by = NULL, lease_token = NULL, last_error = NULL"
            "   FROM done WHERE j.id = done.id AND j.lease_token = done.token AND j.id NOT IN (SELECT id FROM gone)"
            " RETURNING 1",
            ([j.id for j in jobs], [j.token for j in jobs], [j.generation for j in jobs]))

    def fail(self, job: Job, error: str) -> bool:
        """Record the error; re-queue with backoff, or park as failed. True if parked."""
        delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(job.attempts - 1, 0)) * random.uniform(0.8, 1.2)
        rows = self.db.query(
            "UPDATE filestore.jobs SET last_error = %s, leased_until = NULL, leased_by = NULL, lease_token = NULL,"
            "       state = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END,"
            "       run_after = now() + make_interval(secs => %s)"
            " WHERE id = %s AND lease_token = %s RETURNING state",
            (error[:2000], delay, job.id, job.token))
        return bool(rows) and rows[0][0] == "failed"

    def release(self, job: Job, *, delay: float = 0.0) -> None:
        """Give a claimed job back without counting an attempt (a clean stop, or 'not yet')."""
        self.db.query(
            "UPDATE filestore.jobs SET state = 'queued', attempts = greatest(attempts - 1, 0),"
            "       leased_until = NULL, leased_by = NULL, lease_token = NULL,"
            "       run_after = now() + make_interval(secs => %s)"
            " WHERE id = %s AND lease_token = %s RETURNING 1",
            (delay, job.id, job.token))

    # -- observing ---------------------------------------------------------------------
    def stats(self) -> dict[str, dict[str, Any]]:
        """Per queue: depth (queued), running, failed, age of the oldest unfinished job (s)."""
        out = {q: {"depth": 0, "running": 0, "failed": 0, "oldest_age_seconds": 0.0} for q in QUEUES}
        rows = self.db.query(
            "SELECT queue, count(*) FILTER (WHERE state = 'queued'), count(*) FILTER (WHERE state = 'running'),"
            "       count(*) FILTER (WHERE state = 'failed'),"
            "       coalesce(extract(epoch FROM now() - min(enqueued_at) FILTER (WHERE state <> 'failed')), 0)"
            "  FROM filestore.jobs GROUP BY queue")
        for queue, depth, running, failed, age in rows:
            out[queue] = {"depth": depth, "running": running, "failed": failed,
                          "oldest_age_seconds": round(float(age), 3)}
        return out
