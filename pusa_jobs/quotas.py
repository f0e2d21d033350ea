"""Per-key quotas, checked when a job is accepted: concurrent jobs, jobs per minute, GPU-seconds per day.

A job's cost estimate is charged to its key in the ``usage`` ledger in the transaction that creates the
job, after the check, under a per-key lock (PostgreSQL's advisory lock; SQLite's writer lock), so
concurrent requests of one key cannot together overshoot a quota. The ledger outlives deleted jobs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import Connection, func, insert, select

from .api_keys import Quotas
from .jobs import ACTIVE
from .schema import jobs, usage

MINUTE_S = 60.0
DAY_S = 86400.0


class QuotaExceeded(Exception):
    """A request over one of its key's quotas; it may succeed after `retry_after_s`."""

    def __init__(self, quota: str, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.quota = quota
        self.retry_after_s = max(1, math.ceil(retry_after_s))


@dataclass(frozen=True)
class Charge:
    """What accepting a job would cost its key: `gpu_seconds` at time `at`, against `quotas`.
    `busy_retry_s` is the wait suggested when the key's concurrent jobs are all busy."""

    owner: str
    gpu_seconds: float
    quotas: Quotas
    at: float
    busy_retry_s: float


def check(conn: Connection, charge: Charge) -> None:
    """Raise `QuotaExceeded` when accepting the job would break one of the key's quotas."""
    q, owner = charge.quotas, charge.owner
    if q.max_concurrent_jobs is not None:
        active = conn.execute(select(func.count()).select_from(jobs)
                              .where(jobs.c.owner == owner, jobs.c.status.in_(ACTIVE))).scalar_one()
        if active >= q.max_concurrent_jobs:
            raise QuotaExceeded("max_concurrent_jobs", f"this key already has {active} jobs queued or running "
                                f"(its limit is {q.max_concurrent_jobs})", charge.busy_retry_s)
    if q.jobs_per_minute is not None:
        recent = _recent(conn, owner, charge.at - MINUTE_S)
        if len(recent) >= q.jobs_per_minute:
            oldest_counted = recent[len(recent) - q.jobs_per_minute][0]
            raise QuotaExceeded("jobs_per_minute", f"this key made {len(recent)} jobs in the last minute "
                                f"(its limit is {q.jobs_per_minute})", oldest_counted + MINUTE_S - charge.at)
    if q.gpu_seconds_per_day is not None:
        since = charge.at - DAY_S
        used = conn.execute(select(func.coalesce(func.sum(usage.c.gpu_seconds), 0.0))
                            .where(usage.c.owner == owner, usage.c.created_at > since)).scalar_one()
        if used + charge.gpu_seconds > q.gpu_seconds_per_day:
            raise QuotaExceeded("gpu_seconds_per_day", f"this job's estimated {charge.gpu_seconds:.0f} GPU-seconds "
                                f"would bring this key's last 24 hours to {used + charge.gpu_seconds:.0f} (its "
                                f"limit is {q.gpu_seconds_per_day:g})", _day_room_at(conn, charge, used) - charge.at)


def _recent(conn: Connection, owner: str, since: float) -> list[tuple[float, float]]:
    """The key's charges after `since`, oldest first: (time, GPU-seconds)."""
    query = (select(usage.c.created_at, usage.c.gpu_seconds).where(usage.c.owner == owner, usage.c.created_at > since)
             .order_by(usage.c.created_at))
    return [(row.created_at, row.gpu_seconds) for row in conn.execute(query)]


def _day_room_at(conn: Connection, charge: Charge, used: float) -> float:
    """When enough of the key's charges have left the 24-hour window for this job to fit."""
    for created_at, gpu_seconds in _recent(conn, charge.owner, charge.at - DAY_S):
        used -= gpu_seconds
        if used + charge.gpu_seconds <= charge.quotas.gpu_seconds_per_day:
            return created_at + DAY_S
    return charge.at + DAY_S


def lock_owner(conn: Connection, owner: str) -> None:
    """Serialise quota checks of one key until the transaction ends (SQLite's writes already queue)."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_advisory_xact_lock(func.hashtext("pusa-quota:" + owner))))


def record(conn: Connection, charge: Charge, job_id: str) -> None:
    """Check the quotas and record the charge of the job `job_id` (inside the job's creating transaction)."""
    lock_owner(conn, charge.owner)
    check(conn, charge)
    conn.execute(insert(usage).values(job_id=job_id, owner=charge.owner, created_at=charge.at,
                                      gpu_seconds=charge.gpu_seconds))
