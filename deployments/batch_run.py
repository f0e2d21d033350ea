"""Running one batch: its manifest through `pusa batch`'s Ray Data pipeline (the batch pools, not the
online DiT replicas), each finished row a completed video of the batch's owner, and at the end OpenAI's
output and error files. A runner replica that claims a batch starts a `BatchDriver` actor for it: the
pipeline's driver runs in that process (at the batch's CPU priority), so the runner's own loop, which
drives the online jobs, shares neither its interpreter nor its CPU share with it.

The pipeline writes under ``batches/<id>/out/`` in the service's store; a runner that resumes a batch
(after a crash or a drain) skips the rows already complete there. A row's video becomes a job whose id
is derived from the batch and the row, recorded in ``batch_videos`` in the same transaction: registering
it again is a no-op, and a video its owner deleted (wholly, or with its removal cut short) is not made
again; the row goes to the error file as ``video_deleted``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray
from sqlalchemy.exc import IntegrityError

from pusa_batch.outputs import BatchOutputs
from pusa_batch.rows import batch_model, read_row
from pusa_batch.run import BatchSettings, run_batch
from pusa_batch.sources import read_manifest
from pusa_jobs.batches import (FILE_PREFIX, Batch, BatchLease, BatchStore, StoredFile, batch_created_at, batch_folder,
                               file_created_at)
from pusa_jobs.db import is_transient, open_database
from pusa_jobs.job_files import JobFiles
from pusa_jobs.job_store import JobStore, LeaseLost
from pusa_jobs.jobs import JOB_PREFIX, Job, job_created_at, job_plan, new_id
from pusa_jobs.storage import StoreUnavailable, open_store
from pusa_model.errors import InvalidRequest
from pusa_model.loras import LoraRegistry
from pusa_model.presets import MODEL_NAME, get_preset

from .batch_files import deleted_line, error_line, output_line

logger = logging.getLogger("ray.serve")

T = TypeVar("T")


class ModelNotServed(Exception):
    """The batch's model is not served any more (the app was redeployed without it): the batch fails."""


class BatchStopped(Exception):
    """The batch must stop before its rows are done: ``cancelled``, ``expired`` or ``released`` (drain)."""


@dataclass
class BatchContext:
    """What a batch run needs: the database, the store, the pools and timings."""

    batches: BatchStore
    jobs: JobStore
    files: JobFiles  # the service's store
    settings: BatchSettings  # pusa-v1's batches'
    preset: str
    retention_s: float
    renew_s: float
    draining: asyncio.Event
    outage_s: float = 600.0  # how long a row's registration waits out an unreachable database or store
    models: dict[str, str] | None = None  # the models served, name -> preset (None: pusa-v1 on `preset` only)
    wan22_loras: LoraRegistry = field(default_factory=LoraRegistry)  # the registry of a pusa-wan2.2 batch's rows


def manifest_key(batch_id: str) -> str:
    return f"{batch_folder(batch_id)}input.jsonl"


def _video_id(batch: Batch, custom_id: str) -> str:
    """The id of the video a batch's row makes: the batch's creation time (the millisecond its id carries)
    and a hash of (batch, row)."""
    return f"{JOB_PREFIX}{int(round(batch_created_at(batch.id) * 1000)):012x}" + \
        hashlib.sha256(f"{batch.id}/{custom_id}".encode()).hexdigest()[:12]


class BatchRun:
    """Drives one claimed batch to its end (or gives it back when the replica drains)."""

    def __init__(self, ctx: BatchContext, lease: BatchLease) -> None:
        self.ctx = ctx
        self.lease = lease
        self.stop = threading.Event()
        self.stop_reason = ""
        self.store = ctx.files.store
        self.prefix = f"{batch_folder(lease.batch.id)}out"
        self.rows: list[dict] = []  # the manifest, in input order
        self.row_of: dict[str, dict] = {}  # by custom_id

    @property
    def batch(self) -> Batch:
        return self.lease.batch

    @property
    def model(self) -> str:
        """The model the batch's rows name (pusa-v1 when none does; the router refused a file naming two)."""
        try:
            return batch_model(self.rows)
        except InvalidRequest:
            return MODEL_NAME

    @property
    def settings(self) -> BatchSettings:
        """The pipeline's settings for the batch's model: its preset and LoRA registry. A model no longer
        served (the app redeployed without it) fails the batch (`ModelNotServed`)."""
        if self.model == MODEL_NAME:
            return self.ctx.settings
        preset = (self.ctx.models or {}).get(self.model)
        if preset is None:
            raise ModelNotServed(f"model {self.model!r} is not served by this deployment any more")
        return self.ctx.settings.model_copy(update={"preset": preset, "loras": self.ctx.wan22_loras})

    async def run(self) -> None:
        try:
            self.rows = await asyncio.to_thread(read_manifest, f"{self.store.uri}/{manifest_key(self.batch.id)}")
            self.row_of = {row["custom_id"]: row for row in self.rows}
            if self.batch.status == "validating":
                await asyncio.to_thread(self.ctx.batches.update, self.lease, only_if=("validating",),
                                        status="in_progress", in_progress_at=time.time())
            if self.batch.status == "in_progress" and time.time() < self.batch.expires_at:
                await self._generate()
            await asyncio.to_thread(self._finish)
        except BatchStopped:
            if self.stop_reason == "released":
                await asyncio.to_thread(self.ctx.batches.release, self.lease)
                logger.info("batch %s released for another runner", self.batch.id)
            else:
                await asyncio.to_thread(self._finish)
        except LeaseLost as exc:
            logger.warning("%s; stopping here", exc)
        except Exception as exc:
            logger.exception("batch %s failed", self.batch.id)
            now = time.time()
            await asyncio.to_thread(self.ctx.batches.update, self.lease, status="failed", failed_at=now,
                                    lease_holder=None, retention_ends_at=now + self.ctx.retention_s,
                                    errors={"object": "list", "data": [
                                        {"code": "batch_failed", "message": repr(exc)[:500], "param": None,
                                         "line": None}]})

    async def _generate(self) -> None:
        """The manifest through the pipeline while a watcher renews the lease and notices a cancel, the
        end of the completion window or a drain."""
        outputs = BatchOutputs(f"{self.store.uri}/{self.prefix}")
        done = sum(record["status"] == "completed" for record in outputs.records().values())
        await asyncio.to_thread(self.ctx.batches.update, self.lease, completed=done, failed=0)
        watcher = asyncio.create_task(self._watch())
        try:
            await asyncio.to_thread(run_batch, f"{self.store.uri}/{manifest_key(self.batch.id)}", outputs.uri,
                                    self.settings, progress=False, on_record=self._on_record, local_media=False)
        finally:
            watcher.cancel()

    async def _watch(self) -> None:
        """Renew the lease for as long as the pipeline runs (until `_generate` cancels this), also after a stop
        was asked: the rows in flight still finish, and nobody else may take the batch meanwhile."""
        while self.stop_reason != "lost":
            await asyncio.sleep(self.ctx.renew_s)
            try:
                await asyncio.to_thread(self.ctx.batches.update, self.lease)
            except LeaseLost:
                self._stop("lost")
            except Exception as exc:  # the database away: the next round tries again
                logger.warning("renewing batch %s failed: %r", self.batch.id, exc)
            self._check()

    def _check(self) -> None:
        if self.batch.status == "cancelling":
            self._stop("cancelled")
        elif time.time() >= self.batch.expires_at:
            self._stop("expired")
        elif self.ctx.draining.is_set():
            self._stop("released")

    def _stop(self, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
            self.stop.set()

    def _persist(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)`, retried with backoff while the database or the store is unreachable (for up
        to ``outage_s``), as a job's writes are: a brief outage at a row's end does not fail the batch. (Each
        call here is idempotent: a registration finds the video made before, a count is set, not added.)"""
        delay, deadline = 0.2, time.monotonic() + self.ctx.outage_s
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not (is_transient(exc) or isinstance(exc, StoreUnavailable)) or time.monotonic() > deadline:
                    raise
                logger.warning("batch %s: %s unavailable (%s); retrying in %.1f s", self.batch.id,
                               "store" if isinstance(exc, StoreUnavailable) else "database", type(exc).__name__, delay)
                time.sleep(delay)
                delay = min(2 * delay, 5.0)

    def _on_record(self, record: dict) -> None:
        """A row ended (in the pipeline's thread): register its video, count it, stop if asked to."""
        if record["status"] == "completed":
            self._persist(self._register, record)
        column = "completed" if record["status"] == "completed" else "failed"
        count = getattr(self.batch, column) + 1
        self._persist(self.ctx.batches.update, self.lease, **{column: count})
        self._check()
        if self.stop.is_set():
            if self.stop_reason == "lost":
                raise LeaseLost(f"batch {self.batch.id}: lease lost")
            raise BatchStopped(self.stop_reason)

    def _register(self, record: dict) -> Job | None:
        """The completed video of a row as a job of the batch's owner, made once (its id is derived, and
        ``batch_videos`` records it in the same transaction); None once its owner deleted it, even when
        the deletion was cut short (the row is hidden): it is not made again."""
        custom_id = record["custom_id"]
        video_id = _video_id(self.batch, custom_id)
        if self.ctx.batches.registered(self.batch.id, custom_id):
            return self._video(video_id)
        fields = dict(self.row_of[custom_id])
        fields.pop("custom_id")
        settings = self.settings
        preset = get_preset(settings.preset)
        plan, _ = read_row({**fields, "seed": record["seed"]}, preset, base=None, loras=settings.loras)
        files = [self.store.get(f"{self.prefix}/{folder}/{record['custom_id']}.{ext}")
                 for folder, ext in (("videos", "mp4"), ("thumbnails", "webp"))]
        self.ctx.files.put_result(video_id, *files)
        now = time.time()
        job = Job(id=video_id, owner=self.batch.owner, created_at=job_created_at(video_id), model=preset.model,
                  status="completed",
                  progress=100, request=plan.request.model_dump(), plan=job_plan(plan), started_at=now,
                  completed_at=now, expires_at=now + self.ctx.retention_s)
        try:
            return self.ctx.jobs.create(job, {"type": "completed", "url": f"/v1/videos/{video_id}/content"},
                                        also=self.ctx.batches.register_video(self.batch.id, custom_id, video_id))
        except IntegrityError:  # registered meanwhile by a runner that lost this batch (and maybe deleted since)
            video = self._video(video_id)
            if video is None:  # the files just stored belong to a deleted video
                self.ctx.files.delete_all(video_id)
            return video

    def _video(self, video_id: str) -> Job | None:
        """The registered video `video_id`; None when it is deleted or being deleted."""
        job = self.ctx.jobs.peek(video_id)
        return None if job is None or job.delete_requested else job

    def _finish(self) -> None:
        """Write the output and error files in input order and end the batch: ``completed``, or
        ``cancelled`` / ``expired`` with the rows done so far."""
        batches = self.ctx.batches
        if batches.update(self.lease, only_if=("in_progress", "validating"), status="finalizing",
                          finalizing_at=time.time()) is None and self.batch.status not in ("finalizing", "cancelling"):
            return  # ended already
        batch = self.batch
        ended = "cancelled" if batch.status == "cancelling" or self.stop_reason == "cancelled" else \
            "expired" if self.stop_reason == "expired" or time.time() >= batch.expires_at else "completed"
        records = BatchOutputs(f"{self.store.uri}/{self.prefix}").records()
        output, errors, deleted = [], [], 0
        for row in self.rows:
            custom_id, record = row["custom_id"], records.get(row["custom_id"])
            if record is not None and record["status"] == "completed":
                video = self._persist(self._register, record)
                if video is None:  # made, then deleted by its owner: it counts as completed, and stays deleted
                    deleted += 1
                    errors.append(deleted_line(batch.id, custom_id))
                else:
                    output.append(output_line(batch.id, custom_id, video.to_openai()))
            else:
                errors.append(error_line(batch.id, custom_id, record, ended))
        now = time.time()
        retention_ends_at = now + self.ctx.retention_s
        file_ids = {name: self._write_file(name, lines, retention_ends_at)
                    for name, lines in (("output", output), ("error", errors)) if lines}
        batches.update(self.lease, status=ended, **{f"{ended}_at": now}, completed=len(output) + deleted,
                       failed=sum(line["response"] is not None for line in errors),
                       output_file_id=file_ids.get("output"), error_file_id=file_ids.get("error"), lease_holder=None,
                       retention_ends_at=retention_ends_at)
        logger.info("batch %s %s: %d completed, %d with errors", batch.id, ended, len(output), len(errors))

    def _write_file(self, name: str, lines: list[dict], expires_at: float) -> str:
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        file_id = new_id(FILE_PREFIX)
        key = f"{batch_folder(self.batch.id)}{name}.jsonl"
        self.store.put(key, data, "application/jsonl")
        self.ctx.batches.add_file(StoredFile(id=file_id, owner=self.batch.owner, purpose="batch_output",
                                             filename=f"{self.batch.id}_{name}.jsonl", bytes=len(data),
                                             created_at=file_created_at(file_id), key=key, expires_at=expires_at))
        return file_id


@ray.remote(num_cpus=0)
class BatchDriver:
    """The process that drives one batch (an async actor, owned by the runner that claimed the batch: it
    dies with it, and its pipeline's actors with it)."""

    def __init__(self, database: str, store: str, settings: dict, preset: str, retention_s: float, renew_s: float,
                 lease_ttl_s: float, outage_s: float = 600.0, models: dict[str, str] | None = None,
                 wan22_loras: dict | None = None) -> None:
        pools = BatchSettings.model_validate(settings)
        if pools.nice:
            os.nice(pools.nice)
        db = open_database(database)
        self.ctx = BatchContext(batches=BatchStore(db, lease_ttl_s=lease_ttl_s), jobs=JobStore(db, lease_ttl_s=lease_ttl_s),
                                files=JobFiles(open_store(store)), settings=pools, preset=preset,
                                retention_s=retention_s, renew_s=renew_s, draining=asyncio.Event(),
                                outage_s=outage_s, models=models,
                                wan22_loras=LoraRegistry.model_validate(wan22_loras or {}))
        ray.data.DataContext.get_current().enable_progress_bars = False

    async def run(self, lease: BatchLease) -> None:
        """Drive the batch to its end, or give it back once `drain` was called."""
        await BatchRun(self.ctx, lease).run()

    async def drain(self) -> None:
        """Stop when the next row ends and give the batch back (the runner is stopping)."""
        self.ctx.draining.set()
