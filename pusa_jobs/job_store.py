"""Jobs, their events and leases in the job database.

A job is run by the runner that holds its lease. `claim` takes the oldest job that is queued, released,
or whose holder stopped renewing its lease, in one compare-and-set statement (PostgreSQL skips rows other
claimers have locked) and bumps the lease's epoch. Every write a holder makes afterwards is fenced by
that epoch and by the job's event count (`version`): a holder that lost its lease can never overwrite
the new holder's state. Each write also records its own id (holder, epoch, version) in the row, so a
write retried after an unacknowledged commit is recognised by that id instead of being applied twice,
and a holder fenced out meanwhile is told `LeaseLost`, never that its write succeeded. Nothing is
written under a lease once its job has ended. Other replicas only raise flags (cancel, delete) or act
on jobs nobody holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Executable, and_, case, delete, func, insert, or_, select, true, tuple_, update
from sqlalchemy.exc import IntegrityError

from . import quotas
from .db import Database, db_now
from .jobs import ACTIVE, TERMINAL, Job, job_created_at
from .schema import job_events, jobs, usage, webhook_deliveries
from .webhooks import delivery

Order = Literal["asc", "desc"]


class LeaseLost(Exception):
    """This runner no longer holds the job: another one claimed it."""


class IdempotencyConflict(Exception):
    """An `Idempotency-Key` already names a job with a different request."""


@dataclass
class Lease:
    """A runner's hold on a job: the job as claimed, the epoch that fences writes, and the seq of the
    next event (kept up to date by the store's fenced writes)."""

    job: Job
    holder: str
    epoch: int
    version: int

    @property
    def job_id(self) -> str:
        return self.job.id

    @property
    def resumed(self) -> bool:
        """Whether the job was held before (by a runner that released or lost it) rather than fresh."""
        return self.job.version > 1 or self.job.takeovers > 0


@dataclass(frozen=True)
class Signals:
    """What other replicas asked of a job, read back by each fenced write."""

    cancel: bool = False
    delete: bool = False
    abandoned: bool = False  # a streaming client left and did not come back in time


def page_query(query, table, limit: int, after: str | None, order: Order, owner: str | None,
               created_at_of: Callable[[str], float]):
    """`query` over `table` narrowed to `owner`'s rows (every owner's with None), a page of `limit` in
    (created_at, id) order after the row `after` (it need not exist any more: its creation time is read
    from the id by `created_at_of`; `KeyError` for a string that is no such id). Every row's `created_at`
    must be the time its id carries (to the millisecond), as the stores write it: else a page's cursor
    falls between rows, and paging skips or repeats them."""
    if owner is not None:
        query = query.where(table.c.owner == owner)
    if after is not None:
        try:
            cursor = tuple_(created_at_of(after), after)
        except ValueError:
            raise KeyError(after) from None
        key = tuple_(table.c.created_at, table.c.id)
        query = query.where(key < cursor if order == "desc" else key > cursor)
    columns = (table.c.created_at, table.c.id)
    return query.order_by(*(c.desc() if order == "desc" else c.asc() for c in columns)).limit(limit)


def _job(row) -> Job:
    return Job.model_validate(dict(row._mapping))


def _event(row) -> dict[str, Any]:
    return {**row.data, "type": row.type, "seq": row.seq}


def _events_after(job_id: str, seq: int):
    return select(job_events).where(job_events.c.job_id == job_id, job_events.c.seq > seq).order_by(job_events.c.seq)


_ABANDONED = and_(jobs.c.abandon_at.is_not(None), jobs.c.abandon_at < db_now()).label("abandoned")
_SIGNALS = (jobs.c.cancel_requested, jobs.c.delete_requested, _ABANDONED)


def _signals(row) -> Signals:
    return Signals(cancel=bool(row.cancel_requested), delete=bool(row.delete_requested),
                   abandoned=bool(row.abandoned))


class JobStore:
    """Job rows, events and leases in `db`; a lease lasts `lease_ttl_s` after each write or renewal. A job
    that ends without a holder (cancelled while queued) is kept `retention_s` and announced to its own
    webhook URL or else `webhook_url` (the deployment's receiver, if any), as a runner ends one."""

    def __init__(self, db: Database, lease_ttl_s: float = 30.0, retention_s: float = 7 * 86400,
                 webhook_url: str | None = None) -> None:
        self.db = db
        self.lease_ttl_s = lease_ttl_s
        self.retention_s = retention_s
        self.webhook_url = webhook_url

    # -- submission ------------------------------------------------------------------------------

    def create(self, job: Job, event: dict[str, Any], abandon_after_s: float | None = None,
               charge: quotas.Charge | None = None, also: Executable | None = None) -> Job:
        """Insert a new job with `event` as its event 0; with `abandon_after_s`, the job is cancelled that
        long after no client streams it any more (`keep_watching`). With an idempotency key the same
        owner used before: the existing job if its request hash matches, else `IdempotencyConflict`.
        With a `charge`, the owner's quotas are checked and the charge recorded in the same transaction
        (`quotas.QuotaExceeded` when over one); `also`, a statement, runs in it too."""
        # Listing pages by (created_at, id) and reads a cursor's time from its id: the row's time is the id's
        # (to the millisecond), whoever made the job.
        row = job.model_dump(exclude={"version"}) | {"version": 1, "created_at": job_created_at(job.id)}
        values = dict(row)
        if abandon_after_s is not None:
            values["abandon_at"] = db_now() + abandon_after_s
        try:
            with self.db.write() as conn:
                if charge is not None:
                    quotas.record(conn, charge, job.id)
                conn.execute(insert(jobs).values(**values))
                self._insert_event(conn, job.id, 0, event)
                if also is not None:
                    conn.execute(also)
        except IntegrityError:
            existing = self.find_idempotent(job.owner, job.idempotency_key) if job.idempotency_key else None
            if existing is None:
                raise
            if existing.request_hash != job.request_hash:
                raise IdempotencyConflict(job.idempotency_key) from None
            return existing
        return Job.model_validate(row)

    def check_quotas(self, charge: quotas.Charge) -> None:
        """`quotas.QuotaExceeded` if a job of this charge would be refused now (a cheap early check; the
        binding one is in `create`)."""
        with self.db.read() as conn:
            quotas.check(conn, charge)

    def find_idempotent(self, owner: str, key: str) -> Job | None:
        """The job `owner` created with idempotency key `key`, if any (deleted ones included)."""
        with self.db.read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.owner == owner, jobs.c.idempotency_key == key)).first()
        return None if row is None else _job(row)

    # -- reads -----------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        """The job `job_id`; `KeyError` if there is none or its deletion was requested."""
        with self.db.read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        if row is None or row.delete_requested:
            raise KeyError(job_id)
        return _job(row)

    def peek(self, job_id: str) -> Job | None:
        """The job `job_id` as it is, its deletion requested or not; None if there is none."""
        with self.db.read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        return None if row is None else _job(row)

    def list(self, limit: int = 20, after: str | None = None, order: Order = "desc",
             owner: str | None = "") -> list[Job]:
        """Up to `limit` of `owner`'s jobs (every owner's with None) in creation order, after the job id
        `after` (the last of the previous page; it need not exist any more). One index range scan."""
        with self.db.read() as conn:
            return [_job(row) for row in conn.execute(self.list_query(limit, after, order, owner))]

    @staticmethod
    def list_query(limit: int, after: str | None, order: Order, owner: str | None):
        """The SELECT behind `list`: ordered by (created_at, id), which ``ix_jobs_owner_created`` (or
        ``ix_jobs_created`` for every owner) holds in order; the cursor's creation time is in its id."""
        query = select(jobs).where(jobs.c.delete_requested.is_(False))
        return page_query(query, jobs, limit, after, order, owner, job_created_at)

    def poll(self, job_id: str, seq: int) -> tuple[Job | None, list[dict[str, Any]]]:
        """The job (None once it is gone) and its events after `seq`, read in that order: when the job is
        ended, its final event is among them."""
        with self.db.read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
            if row is None or row.delete_requested:
                return None, []
            return _job(row), [_event(e) for e in conn.execute(_events_after(job_id, seq))]

    def events_after(self, job_id: str, seq: int) -> list[dict[str, Any]]:
        """The job's events with `seq` greater than `seq` (-1 for all), in order."""
        with self.db.read() as conn:
            return [_event(row) for row in conn.execute(_events_after(job_id, seq))]

    def queued_count(self) -> int:
        """Jobs waiting for a runner (the queue's length)."""
        with self.db.read() as conn:
            return conn.execute(select(func.count()).select_from(jobs).where(jobs.c.status == "queued")).scalar_one()

    def queue_position(self, job: Job) -> int | None:
        """1-based place of a queued job in the queue (oldest first); None unless it is queued."""
        if job.status != "queued":
            return None
        ahead = (select(func.count()).select_from(jobs)
                 .where(jobs.c.status == "queued", tuple_(jobs.c.created_at, jobs.c.id) < tuple_(job.created_at, job.id)))
        with self.db.read() as conn:
            return conn.execute(ahead).scalar_one() + 1

    # -- requests from any replica ---------------------------------------------------------------

    def request_cancel(self, job_id: str) -> None:
        """Ask for the job to stop: a queued job nobody holds ends now; a running one ends when its
        holder reads the flag after its current step."""
        with self.db.write() as conn:
            row = conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status.in_(ACTIVE))
                               .values(cancel_requested=True).returning(*jobs.c)).first()
            if row is not None and row.lease_holder is None and row.status == "queued":
                self._end_unheld(conn, _job(row), "cancelled")

    def request_delete(self, job_id: str) -> bool:
        """Mark the job deleted (hidden at once) and cancel it if it runs. True when it has ended, so the
        caller removes it now; False when its holder removes it once it stops."""
        with self.db.write() as conn:
            row = conn.execute(update(jobs).where(jobs.c.id == job_id)
                               .values(delete_requested=True, cancel_requested=jobs.c.status.in_(ACTIVE))
                               .returning(*jobs.c)).first()
            if row is None:
                raise KeyError(job_id)
            job = _job(row)
            if job.status == "queued" and job.lease_holder is None:
                self._end_unheld(conn, job, "cancelled")
                return True
            return job.terminal

    def keep_watching(self, job_id: str, grace_s: float) -> None:
        """A client streams the job: push back the time at which a job created by a stream is cancelled
        for want of one (jobs without that deadline are not touched)."""
        with self.db.write() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.abandon_at.is_not(None),
                                            jobs.c.status.in_(ACTIVE))
                         .values(abandon_at=db_now() + grace_s))

    def delete(self, job_id: str) -> None:
        """Remove the job's row and events (its files are the caller's)."""
        with self.db.write() as conn:
            conn.execute(delete(jobs).where(jobs.c.id == job_id))

    def _end_unheld(self, conn, job: Job, status: str) -> None:
        """End a job nobody holds (guarded by its unchanged version and active status) as a holder's
        `finish` would: its retention period starts and its webhook delivery is queued."""
        now = time.time()
        done = conn.execute(update(jobs).where(jobs.c.id == job.id, jobs.c.version == job.version,
                                               jobs.c.lease_holder.is_(None), jobs.c.status.in_(ACTIVE))
                            .values(status=status, completed_at=now, expires_at=now + self.retention_s,
                                    abandon_at=None, version=job.version + 1))
        if done.rowcount:
            self._insert_event(conn, job.id, job.version, {"type": status})
            url = job.webhook_url or self.webhook_url
            if url:
                conn.execute(insert(webhook_deliveries).values(**delivery(job.id, status, url)))

    # -- leases ----------------------------------------------------------------------------------

    def claim(self, holder: str, running: Collection[str] | None = None) -> Lease | None:
        """Take the oldest job that is queued, released, or whose lease expired and start it; None if there
        is none. A job taken from a lost holder counts a takeover. With `running` (the ids of the jobs
        `holder` is running now), a lapsed lease of `holder` itself is claimable unless its job is among
        them (its run has ended: nobody runs the job); without it, no job `holder` held is."""
        now = db_now()
        if running is None:
            not_mine = or_(jobs.c.lease_holder.is_(None), jobs.c.lease_holder != holder)
        else:
            not_mine = jobs.c.id.not_in(list(running)) if running else true()
        claimable = and_(
            jobs.c.status.in_(ACTIVE),
            or_(jobs.c.lease_expires_at.is_(None), jobs.c.lease_expires_at < now),
            not_mine,
        )
        oldest = (select(jobs.c.id).where(claimable).order_by(jobs.c.created_at, jobs.c.id).limit(1)
                  .with_for_update(skip_locked=True).scalar_subquery())
        stmt = (update(jobs).where(jobs.c.id == oldest, claimable)
                .values(lease_holder=holder, lease_epoch=jobs.c.lease_epoch + 1, lease_expires_at=now + self.lease_ttl_s,
                        takeovers=jobs.c.takeovers + case((jobs.c.lease_holder.is_(None), 0), else_=1),
                        adopted=jobs.c.lease_holder.is_not(None),  # SET reads the row as it was
                        status="in_progress", started_at=func.coalesce(jobs.c.started_at, now))
                .returning(*jobs.c))
        with self.db.write() as conn:
            row = conn.execute(stmt).first()
        if row is None:
            return None
        job = _job(row)
        return Lease(job=job, holder=holder, epoch=job.lease_epoch, version=job.version)

    def renew(self, holder: str, running: dict[str, int]) -> dict[str, int]:
        """Extend the leases `holder` holds on the jobs it is running now ({job id: epoch of its lease});
        returns {job id: epoch} of those it still holds. The lease of a job the holder no longer runs (its
        run gave up on an outage, or could not record the job's end) is not renewed: it lapses, and the
        job is adopted.

        A job whose row another transaction has locked (mostly the job's own write in flight, which renews
        its lease as it commits) is not waited for: it counts as held while its committed row says so, and
        is renewed at the next round. One slow write (a held lock, a stalled statement) thus does not stop
        the renewal of the holder's other jobs until their leases lapse."""
        if not running:
            return {}
        leases = or_(*(and_(jobs.c.id == job_id, jobs.c.lease_epoch == epoch) for job_id, epoch in running.items()))
        mine = and_(jobs.c.lease_holder == holder, jobs.c.status.in_(ACTIVE), leases)
        unlocked = select(jobs.c.id).where(mine).with_for_update(skip_locked=True).scalar_subquery()
        stmt = (update(jobs).where(jobs.c.id.in_(unlocked), mine)
                .values(lease_expires_at=db_now() + self.lease_ttl_s).returning(jobs.c.id, jobs.c.lease_epoch))
        with self.db.write() as conn:
            held = {row.id: row.lease_epoch for row in conn.execute(stmt)}
            locked = conn.execute(select(jobs.c.id, jobs.c.lease_epoch).where(mine, jobs.c.id.not_in(list(held))))
            return held | {row.id: row.lease_epoch for row in locked}

    def record(self, lease: Lease, event: dict[str, Any] | None = None, **changes: Any) -> Signals:
        """Apply `changes` to the held job and append `event`; renews the lease. Returns the flags other
        replicas raised. `LeaseLost` if another runner holds the job now, or it has ended."""
        values = {**changes, "lease_expires_at": db_now() + self.lease_ttl_s}
        return self._fenced(lease, event, values, keeps_lease=True)

    def finish(self, lease: Lease, status: str, event: dict[str, Any], *, error: dict | None = None,
               retention_s: float, progress: int | None = None, webhook: dict[str, Any] | None = None) -> Signals:
        """End the held job with `status` and its final `event`, end the lease (its epoch moves on: no write
        of the holder applies any more), start its retention period and queue its webhook delivery (a
        ``webhook_deliveries`` row), all in one transaction."""
        assert status in TERMINAL, status
        now = time.time()
        values = {"status": status, "error": error, "completed_at": now, "expires_at": now + retention_s,
                  "lease_holder": None, "lease_expires_at": None, "lease_epoch": lease.epoch + 1,
                  "checkpoint_step": None, "checkpoint_key": None, "abandon_at": None}
        if progress is not None:
            values["progress"] = progress
        return self._fenced(lease, event, values, keeps_lease=False,
                            also=None if webhook is None else insert(webhook_deliveries).values(**webhook))

    def release(self, lease: Lease, event: dict[str, Any], **changes: Any) -> None:
        """Apply `changes` and give the held job back (a runner draining): another runner may claim it
        at once."""
        self._fenced(lease, event, {**changes, "lease_holder": None, "lease_expires_at": None,
                                    "lease_epoch": lease.epoch + 1}, keeps_lease=False)

    @staticmethod
    def write_id(lease: Lease) -> str:
        """The id of the holder's next write: its lease (holder and epoch; epochs are never reused) and
        the job's version the write expects. A retry of the same write has the same id; no other write has."""
        return f"{lease.holder}/{lease.epoch}/{lease.version}"

    def _fenced(self, lease: Lease, event: dict[str, Any] | None, values: dict[str, Any], *, keeps_lease: bool,
                also=None) -> Signals:
        """One fenced write: applied only while `lease` is the job's current lease (same epoch, the version
        it expects) and the job has not ended (nothing is written after a terminal state)."""
        write_id = self.write_id(lease)
        if event is not None:
            values["version"] = lease.version + 1
        values["last_write"] = write_id
        fence = (jobs.c.id == lease.job_id, jobs.c.lease_epoch == lease.epoch, jobs.c.version == lease.version,
                 jobs.c.status.in_(ACTIVE))
        with self.db.write() as conn:
            row = conn.execute(update(jobs).where(*fence).values(**values).returning(*_SIGNALS)).first()
            if row is None:
                row = self._already_applied(conn, lease, event, write_id, keeps_lease)
            else:
                if event is not None:
                    self._insert_event(conn, lease.job_id, lease.version, event)
                if also is not None:
                    conn.execute(also)
        if event is not None:
            lease.version += 1
        return _signals(row)

    def _already_applied(self, conn, lease: Lease, event: dict[str, Any] | None, write_id: str, keeps_lease: bool):
        """After a fenced write matched no row: the job's flags if this very write (`write_id`) committed
        before and was the job's last write (its acknowledgement was lost and it is being retried), and,
        for a write that keeps the lease, the lease is still this holder's; else `LeaseLost`. A version
        and epoch pattern is never taken for proof: a takeover and its first write look the same."""
        row = conn.execute(select(jobs.c.lease_epoch, jobs.c.lease_holder, jobs.c.version, jobs.c.last_write,
                                  *_SIGNALS).where(jobs.c.id == lease.job_id)).first()
        if row is not None and event is not None and row.last_write == write_id and \
                row.version == lease.version + 1 and \
                (not keeps_lease or (row.lease_epoch == lease.epoch and row.lease_holder == lease.holder)):
            return row
        raise LeaseLost(f"job {lease.job_id}: lease epoch {lease.epoch} of {lease.holder} is no longer current")

    @staticmethod
    def _insert_event(conn, job_id: str, seq: int, event: dict[str, Any]) -> None:
        data = {k: v for k, v in event.items() if k not in ("type", "seq")}
        conn.execute(insert(job_events).values(job_id=job_id, seq=seq, type=event["type"], data=data,
                                               created_at=time.time()))

    # -- retention -------------------------------------------------------------------------------

    def expired(self, limit: int = 100) -> list[str]:
        """Ids of ended jobs whose retention period is over, oldest first."""
        query = (select(jobs.c.id).where(jobs.c.expires_at < db_now()).order_by(jobs.c.expires_at).limit(limit))
        with self.db.read() as conn:
            return list(conn.execute(query).scalars())

    def prune_usage(self) -> int:
        """Forget charges older than any quota's window; returns how many."""
        with self.db.write() as conn:
            return conn.execute(delete(usage).where(usage.c.created_at < time.time() - quotas.DAY_S)).rowcount

    def delete_expired(self, job_id: str) -> bool:
        """Remove an expired job's row (after its files); False if it is gone or not expired."""
        with self.db.write() as conn:
            return bool(conn.execute(delete(jobs).where(jobs.c.id == job_id, jobs.c.expires_at < db_now())).rowcount)
