"""The journal's hash chain (docs/architecture.md D41): checking it.

Each journal row carries `hash = sha256(hash of the row before || its content)` and the id of
the row it was chained after (`chain_prev`), written by triggers in the inserting transaction
(schema.sql, schema 11). Checking a row needs only its predecessor's stored hash: if a row's
content changed, its own hash no longer matches; if its hash was rewritten to match, the next
row's does not; if a row was deleted, the next row names a predecessor that is not there. So
the check is one set-based pass (a window over id order) that stops at the first row that does
not match.
"""
from __future__ import annotations

from dataclasses import dataclass

import psycopg

from core.storage.db import Database

CHAIN_LOCK = 1246909004  # 'JRNL', as in filestore.journal_chain_begin

_CHECK = """
WITH chain AS (SELECT starts_after FROM filestore.journal_chain),
rows AS (
    SELECT j.id, j.chain_prev, j.hash,
           lag(j.id) OVER w AS prev_id, lag(j.hash) OVER w AS prev_hash, j AS row
      FROM filestore.journal_entries j
     WHERE j.id >= %(from)s
    WINDOW w AS (ORDER BY j.id)
), checked AS (
    SELECT r.id, r.chain_prev, r.prev_id,
           CASE WHEN r.hash IS NULL THEN 'no hash'
                WHEN r.prev_id IS NULL AND r.id > %(from)s THEN NULL  -- the first row looked at: its predecessor is below
                WHEN r.chain_prev IS DISTINCT FROM r.prev_id THEN 'predecessor'
                WHEN r.hash <> filestore.journal_row_hash(r.row,
                         CASE WHEN r.prev_id IS NULL OR r.prev_id <= c.starts_after THEN NULL ELSE r.prev_hash END)
                     THEN 'content'
           END AS problem
      FROM rows r, chain c
     WHERE r.id > c.starts_after AND r.id >= %(since)s
)
SELECT n.n, bad.id, bad.chain_prev, bad.prev_id, bad.problem
  FROM (SELECT count(*) AS n FROM checked) n
  LEFT JOIN (SELECT * FROM checked WHERE problem IS NOT NULL ORDER BY id LIMIT 1) bad ON true
"""


@dataclass
class Verdict:
    checked: int  # rows whose hash was recomputed
    starts_after: int  # rows up to this id predate the chain
    head_id: int | None
    head_hash: str | None
    bad_id: int | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.bad_id is None

    def as_dict(self) -> dict:
        return {"ok": self.ok, "checked": self.checked, "chain_starts_after": self.starts_after,
                "head": {"id": self.head_id, "hash": self.head_hash},
                "first_mismatch": None if self.ok else {"id": self.bad_id, "reason": self.reason}}


def seal(conn: psycopg.Connection) -> int:
    """Hash the rows REPEATABLE READ transactions left for the next chain step (under the lock)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK,))
        return conn.execute("SELECT filestore.journal_seal()").fetchone()[0]


def verify(db: Database, since: int | None = None) -> Verdict:
    """Recompute the chain from `since` (a journal id; the whole chain when None) and name the
    first row that does not match."""
    with db.pool.connection() as conn:
        seal(conn)
        starts_after = conn.execute("SELECT starts_after FROM filestore.journal_chain").fetchone()[0]
        since = max(since or 0, starts_after + 1)
        # The row before `since` is read too: the first row checked needs its predecessor.
        below = conn.execute("SELECT max(id) FROM filestore.journal_entries WHERE id < %s", (since,)).fetchone()[0]
        row = conn.execute(_CHECK, {"from": below if below is not None else since, "since": since}).fetchone()
        head = conn.execute("SELECT id, encode(hash, 'hex') FROM filestore.journal_entries"
                            " ORDER BY id DESC LIMIT 1").fetchone() or (None, None)
    checked, bad_id, chain_prev, prev_id, problem = row
    verdict = Verdict(checked, starts_after, head[0], head[1])
    if bad_id is not None:
        verdict.bad_id = bad_id
        verdict.reason = _reason(bad_id, chain_prev, prev_id, problem)
    return verdict


def _reason(row_id: int, chain_prev: int | None, prev_id: int | None, problem: str) -> str:
    if problem == "no hash":
        return f"journal row {row_id} carries no hash (written after the chain started: its hash was removed)"
    if problem == "predecessor":
        if chain_prev is not None and (prev_id is None or chain_prev > prev_id):
            return (f"journal row {row_id} was chained after row {chain_prev}, which is not there any more"
                    f" (deleted)")
        return (f"journal row {row_id} was chained after row {chain_prev}, but row {prev_id} comes before it now"
                f" (a row was inserted, or its link changed)")
    return (f"journal row {row_id} does not match its hash: the row was changed after it was written"
            f" (or the row before it, {prev_id}, was)")
