"""Batches of video requests and their files (OpenAI's Batch and Files APIs) in the job database.

A batch is created ``validating`` with its input already checked. One runner replica at a time, cluster
wide, holds a batch under a lease (so the batch pools' GPU cap holds however many runners there are);
it moves the batch to ``in_progress``, counts rows as they end, then ``finalizing`` and ``completed``.
``cancelling`` is set by the API; the holder ends the batch ``cancelled`` with what was done. A holder
that dies stops renewing; another runner claims the batch and resumes it from its output prefix.

Retention: an ended batch is kept until ``retention_ends_at``, a file until ``expires_at``; then the
runners' sweep (`pusa_jobs.retention`) deletes them with what they stored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from sqlalchemy import Insert, and_, exists, func, insert, or_, select, update

from . import quotas
from .db import Database, db_now
from .job_store import LeaseLost, Order, page_query
from .jobs import id_created_at
from .schema import batch_videos, batches, files

FILE_PREFIX = "file-"
BATCH_PREFIX = "batch_"
FilePurpose = Literal["batch", "batch_output"]
BatchStatus = Literal["validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling",
                      "cancelled"]
RUNNABLE = ("validating", "in_progress", "finalizing", "cancelling")  # a runner has work to do on these
_CLAIM_LOCK = 0x7075_7362  # PostgreSQL advisory lock key that serialises batch claims ("pusb")


class StoredFile(BaseModel):
    """A row of ``files``: an uploaded batch input or a batch's output or error file."""

    id: str
    owner: str
    purpose: FilePurpose
    filename: str
    bytes: int
    created_at: float
    key: str  # in the blob store
    expires_at: float | None = None  # when the sweep deletes it

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": int(self.created_at),
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "expires_at": None if self.expires_at is None else int(self.expires_at), "status_details": None}


class Batch(BaseModel):
    """A row of ``batches``."""

    id: str
    owner: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    metadata: dict[str, str] | None = None
    cost_gpu_s: float
    total: int
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: dict[str, Any] | None = None
    created_at: float
    expires_at: float
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    lease_holder: str | None = None
    lease_epoch: int = 0
    lease_expires_at: float | None = None
    retention_ends_at: float | None = None  # set when it ends: when the sweep deletes it

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's `Batch` object, Pusa's cost estimate under ``pusa``."""
        times = ("created_at", "expires_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at",
                 "expired_at", "cancelling_at", "cancelled_at")
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint, "input_file_id": self.input_file_id,
            "completion_window": self.completion_window, "status": self.status,
            "output_file_id": self.output_file_id, "error_file_id": self.error_file_id, "errors": self.errors,
            **{name: None if getattr(self, name) is None else int(getattr(self, name)) for name in times},
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata, "pusa": {"cost_gpu_s": self.cost_gpu_s},
        }


@dataclass
class BatchLease:
    """A runner's hold on a batch; `epoch` fences its writes."""

    batch: Batch
    holder: str
    epoch: int


def file_created_at(file_id: str) -> float:
    return id_created_at(file_id, FILE_PREFIX)


def batch_created_at(batch_id: str) -> float:
    return id_created_at(batch_id, BATCH_PREFIX)


def batch_folder(batch_id: str) -> str:
    """Where a batch keeps what it stores: its requests, the pipeline's outputs, its output and error files."""
    return f"batches/{batch_id}/"


class BatchStore:
    """Files and batches in `db`; a batch's lease lasts `lease_ttl_s` after each renewal."""

    def __init__(self, db: Database, lease_ttl_s: float = 30.0) -> None:
        self.db = db
        self.lease_ttl_s = lease_ttl_s

    # -- files -----------------------------------------------------------------------------------

    def add_file(self, stored: StoredFile) -> None:
        with self.db.write() as conn:
            # its time is its id's, to the millisecond (the listing's cursor reads it from the id)
            conn.execute(insert(files).values(**stored.model_dump(exclude={"created_at"}),
                                              created_at=file_created_at(stored.id)))

    def get_file(self, file_id: str) -> StoredFile:
        """The file `file_id`; `KeyError` if there is none."""
        with self.db.read() as conn:
            row = conn.execute(select(files).where(files.c.id == file_id)).first()
        if row is None:
            raise KeyError(file_id)
        return StoredFile.model_validate(dict(row._mapping))

    def list_files(self, limit: int, after: str | None, order: Order, owner: str | None,
                   purpose: str | None = None) -> list[StoredFile]:
        """A page of `owner`'s files (everyone's with None), of one `purpose` if given."""
        query = select(files) if purpose is None else select(files).where(files.c.purpose == purpose)
        with self.db.read() as conn:
            rows = conn.execute(page_query(query, files, limit, after, order, owner, file_created_at))
            return [StoredFile.model_validate(dict(row._mapping)) for row in rows]

    def delete_file(self, file_id: str) -> None:
        with self.db.write() as conn:
            conn.execute(files.delete().where(files.c.id == file_id))

    def expired_files(self, limit: int = 100) -> list[StoredFile]:
        """Files whose retention is over, oldest first."""
        query = select(files).where(files.c.expires_at < db_now()).order_by(files.c.expires_at).limit(limit)
        with self.db.read() as conn:
            return [StoredFile.model_validate(dict(row._mapping)) for row in conn.execute(query)]

    def delete_expired_file(self, file_id: str) -> bool:
        """Remove an expired file's row (after its bytes); False if it is gone or not expired."""
        with self.db.write() as conn:
            return bool(conn.execute(files.delete().where(files.c.id == file_id, files.c.expires_at < db_now()))
                        .rowcount)

    # -- batches ---------------------------------------------------------------------------------

    def create(self, batch: Batch, charge: quotas.Charge | None = None) -> Batch:
        """Insert a new batch, charging its cost estimate to its key (`quotas.QuotaExceeded` when over)."""
        with self.db.write() as conn:
            if charge is not None:
                quotas.record(conn, charge, batch.id)
            # its time is its id's, to the millisecond (the listing's cursor reads it from the id)
            batch = batch.model_copy(update={"created_at": batch_created_at(batch.id)})
            conn.execute(insert(batches).values(**batch.model_dump()))
        return batch

    def get(self, batch_id: str) -> Batch:
        """The batch `batch_id`; `KeyError` if there is none."""
        with self.db.read() as conn:
            row = conn.execute(select(batches).where(batches.c.id == batch_id)).first()
        if row is None:
            raise KeyError(batch_id)
        return Batch.model_validate(dict(row._mapping))

    def list(self, limit: int, after: str | None, order: Order, owner: str | None) -> list[Batch]:
        with self.db.read() as conn:
            rows = conn.execute(page_query(select(batches), batches, limit, after, order, owner, batch_created_at))
            return [Batch.model_validate(dict(row._mapping)) for row in rows]

    def unfinished_count(self, owner: str) -> int:
        """`owner`'s batches not yet ended."""
        with self.db.read() as conn:
            return conn.execute(select(func.count()).select_from(batches)
                                .where(batches.c.owner == owner, batches.c.status.in_(RUNNABLE))).scalar_one()

    def request_cancel(self, batch_id: str) -> None:
        """Ask for the batch to stop: a validating or running batch becomes ``cancelling``; its holder
        (or the next runner to claim it) ends it ``cancelled``."""
        with self.db.write() as conn:
            conn.execute(update(batches).where(batches.c.id == batch_id,
                                               batches.c.status.in_(("validating", "in_progress")))
                         .values(status="cancelling", cancelling_at=time.time()))

    # -- leases ----------------------------------------------------------------------------------

    def claim(self, holder: str) -> BatchLease | None:
        """Take the oldest batch with work left whose lease is free or expired, unless another runner
        holds a live lease on a batch (one batch runs at a time on the cluster); None if there is none."""
        now = db_now()
        live = and_(batches.c.lease_holder.is_not(None), batches.c.lease_expires_at >= now)
        claimable = and_(batches.c.status.in_(RUNNABLE), or_(batches.c.lease_holder.is_(None),
                                                             batches.c.lease_expires_at < now))
        oldest = (select(batches.c.id).where(claimable).order_by(batches.c.created_at, batches.c.id).limit(1)
                  .scalar_subquery())
        stmt = (update(batches)
                .where(batches.c.id == oldest, claimable,
                       ~exists(select(batches.c.id).where(batches.c.status.in_(RUNNABLE), live)))
                .values(lease_holder=holder, lease_epoch=batches.c.lease_epoch + 1, lease_expires_at=now + self.lease_ttl_s)
                .returning(*batches.c))
        with self.db.write() as conn:
            if self.db.dialect == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_CLAIM_LOCK})")
            row = conn.execute(stmt).first()
        if row is None:
            return None
        batch = Batch.model_validate(dict(row._mapping))
        return BatchLease(batch=batch, holder=holder, epoch=batch.lease_epoch)

    def update(self, lease: BatchLease, only_if: tuple[str, ...] | None = None, **values: Any) -> Batch | None:
        """Apply `values` to the held batch (when its status is one of `only_if`, if given) and renew the
        lease; returns the batch as it is now, or None when `only_if` did not match (`lease.batch` is
        then the batch as it is). `LeaseLost` if another runner holds it."""
        fence = [batches.c.id == lease.batch.id, batches.c.lease_epoch == lease.epoch]
        if only_if is not None:
            fence.append(batches.c.status.in_(only_if))
        stmt = (update(batches).where(*fence).values(**values, lease_expires_at=db_now() + self.lease_ttl_s)
                .returning(*batches.c))
        with self.db.write() as conn:
            row = conn.execute(stmt).first()
            matched = row is not None
            if not matched:
                row = conn.execute(select(batches).where(batches.c.id == lease.batch.id)).first()
                if row is None or row.lease_epoch != lease.epoch:
                    raise LeaseLost(f"batch {lease.batch.id}: lease epoch {lease.epoch} is no longer current")
        lease.batch = Batch.model_validate(dict(row._mapping))
        return lease.batch if matched else None

    # -- the videos of its rows ------------------------------------------------------------------

    @staticmethod
    def register_video(batch_id: str, custom_id: str, video_id: str) -> Insert:
        """The INSERT that records row `custom_id`'s video as made, for the transaction that makes it
        (`JobStore.create`'s ``also``): a second one for the row fails (`IntegrityError`)."""
        return insert(batch_videos).values(batch_id=batch_id, custom_id=custom_id, video_id=video_id)

    def registered(self, batch_id: str, custom_id: str) -> bool:
        """Whether the video of the batch's row `custom_id` was made (it may have been deleted since)."""
        with self.db.read() as conn:
            return conn.execute(select(batch_videos.c.video_id).where(
                batch_videos.c.batch_id == batch_id, batch_videos.c.custom_id == custom_id)).first() is not None

    # -- retention -------------------------------------------------------------------------------

    def expired(self, limit: int = 100) -> list[str]:
        """Ids of ended batches whose retention is over, oldest first."""
        query = (select(batches.c.id).where(batches.c.retention_ends_at < db_now())
                 .order_by(batches.c.retention_ends_at).limit(limit))
        with self.db.read() as conn:
            return list(conn.execute(query).scalars())

    def delete_expired(self, batch_id: str) -> bool:
        """Remove an expired batch's row and the record of its videos (after its stored files); False if it
        is gone or not expired."""
        with self.db.write() as conn:
            return bool(conn.execute(batches.delete().where(batches.c.id == batch_id,
                                                            batches.c.retention_ends_at < db_now())).rowcount)

    def release(self, lease: BatchLease) -> None:
        """Give the batch back (a runner draining): another runner may claim it at once."""
        self.update(lease, lease_holder=None, lease_epoch=lease.epoch + 1)
