"""Video job records, their inputs, results, progress events and cancel markers, kept in a `Store`."""

from __future__ import annotations

import bisect
import re
import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from deployments.storage import Store

Status = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
Variant = Literal["video", "thumbnail"]

_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_RESULT_FILES: dict[str, tuple[str, str]] = {
    "video": ("video.mp4", "video/mp4"),
    "thumbnail": ("thumbnail.webp", "image/webp"),
}


def new_job_id(created_at: float | None = None) -> str:
    """`video_` + 24 hex: the creation time in ms (12 hex) then 48 random bits, so ids sort by creation."""
    ms = int((time.time() if created_at is None else created_at) * 1000)
    return f"video_{ms:012x}{secrets.token_hex(6)}"


def _seconds(frames: int, fps: float) -> str:
    return f"{frames / fps:.2f}".rstrip("0").rstrip(".")


class Job(BaseModel):
    """One video generation job; `request` and `plan` are opaque dicts (the request and its resolved plan)."""

    id: str
    created_at: float
    status: Status = "queued"
    progress: int = Field(default=0, ge=0, le=100)
    request: dict[str, Any]
    plan: dict[str, Any]
    error: dict[str, str] | None = None
    started_at: float | None = None
    completed_at: float | None = None
    owner: str | None = None
    heartbeat_at: float | None = None
    attempts: int = 0
    inputs: dict[str, str] = Field(default_factory=dict)
    events: list[dict[str, Any]] = Field(default_factory=list)
    model: str = "pusa-v1"
    extended_from: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_openai(self, queue_position: int | None = None) -> dict[str, Any]:
        """The OpenAI `Video` object, with Pusa's own fields under `pusa`.

        `cancelled` stays its own status: OpenAI's clients parse unknown enum values leniently.
        """
        plan = self.plan
        return {
            "id": self.id,
            "object": "video",
            "created_at": int(self.created_at),
            "completed_at": None if self.completed_at is None else int(self.completed_at),
            "expires_at": None,
            "status": self.status,
            "progress": self.progress,
            "model": self.model,
            "prompt": self.request.get("prompt"),
            "seconds": _seconds(plan["frames"], plan["fps"]),
            "size": f"{plan['width']}x{plan['height']}",
            "error": self.error,
            "remixed_from_video_id": None,
            "pusa": {
                "task": self.request.get("task"),
                "seed": plan.get("seed"),
                "steps": plan.get("steps"),
                "frames": plan["frames"],
                "fps": plan["fps"],
                "queue_position": queue_position,
                "extended_from": self.extended_from,
            },
        }


class JobStore:
    """Jobs in a `Store`: `jobs/{id}.json` records, `jobs/{id}.cancel` markers, `active/{id}` for
    unfinished jobs, `inputs/{id}/{name}` and `results/{id}/{video.mp4,thumbnail.webp}`.

    The router that owns a job is the only writer of its record; other replicas cancel it through the
    marker. Owners heartbeat (save with a fresh `heartbeat_at`) queued jobs as well as running ones.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    @staticmethod
    def _id(job_id: str) -> str:
        if not _ID.fullmatch(job_id):
            raise KeyError(job_id)
        return job_id

    def _record(self, job_id: str) -> str:
        return f"jobs/{self._id(job_id)}.json"

    def _active(self, job_id: str) -> str:
        return f"active/{self._id(job_id)}"

    def _cancel(self, job_id: str) -> str:
        return f"jobs/{self._id(job_id)}.cancel"

    def create(self, job: Job) -> Job:
        """Store a new job (the active marker first, so a crash never leaves an unrecoverable record)."""
        self.save(job)
        return job

    def get(self, job_id: str) -> Job:
        """The job `job_id`; `KeyError` if there is none."""
        try:
            data = self.store.get(self._record(job_id))
        except KeyError:
            raise KeyError(job_id) from None
        return Job.model_validate_json(data)

    def save(self, job: Job) -> None:
        """Write the record and keep the active index in step with its status."""
        if job.terminal:
            self.store.put(self._record(job.id), job.model_dump_json().encode(), "application/json")
            self.store.delete(self._active(job.id))
        else:
            self.store.put(self._active(job.id), b"")
            self.store.put(self._record(job.id), job.model_dump_json().encode(), "application/json")

    def _ids(self) -> list[str]:
        keys = self.store.list("jobs/")
        return sorted(key.removeprefix("jobs/").removesuffix(".json") for key in keys if key.endswith(".json"))

    def list(self, limit: int = 20, after: str | None = None, order: Literal["asc", "desc"] = "desc") -> list[Job]:
        """Up to `limit` jobs in creation order (ids from `new_job_id` sort by creation time), starting
        after the job id `after` (the last item of the previous page; it need not still exist)."""
        ids = self._ids()
        if order == "desc":
            end = len(ids) if after is None else bisect.bisect_left(ids, after)
            page = ids[max(0, end - limit) : end][::-1]
        else:
            start = 0 if after is None else bisect.bisect_right(ids, after)
            page = ids[start : start + limit]
        jobs = []
        for job_id in page:
            try:
                jobs.append(self.get(job_id))
            except KeyError:  # deleted since it was listed
                continue
        return jobs

    def delete(self, job_id: str) -> None:
        """Remove the job's record, inputs, results and markers (the record last)."""
        self._id(job_id)
        self.store.delete(self._active(job_id))
        self.store.delete(self._cancel(job_id))
        self.store.delete_prefix(f"inputs/{job_id}/")
        self.store.delete_prefix(f"results/{job_id}/")
        self.store.delete(self._record(job_id))

    def active_ids(self) -> list[str]:
        """Ids of jobs not yet in a terminal status, oldest first."""
        return [key.removeprefix("active/") for key in self.store.list("active/")]

    def add_event(self, job: Job, event: dict[str, Any]) -> dict[str, Any]:
        """Append a copy of `event` with the next `seq` (0, 1, ...) to `job.events` and return it; the
        caller saves the job."""
        event = {**event, "seq": job.events[-1]["seq"] + 1 if job.events else 0}
        job.events.append(event)
        return event

    def events_after(self, job_id: str, seq: int) -> list[dict[str, Any]]:
        """The stored events of `job_id` with `seq` greater than `seq` (-1 for all)."""
        return [event for event in self.get(job_id).events if event["seq"] > seq]

    def request_cancel(self, job_id: str) -> None:
        """Ask the owner to cancel, through a marker object rather than the owner's record."""
        self.store.put(self._cancel(job_id), b"")

    def cancel_requested(self, job_id: str) -> bool:
        return self.store.exists(self._cancel(job_id))

    def put_input(self, job_id: str, name: str, data: bytes) -> str:
        """Store the request field `name`'s uploaded bytes and return their key."""
        key = f"inputs/{self._id(job_id)}/{name}"
        self.store.put(key, data)
        return key

    def result_key(self, job_id: str, variant: Variant) -> str:
        return f"results/{self._id(job_id)}/{_RESULT_FILES[variant][0]}"

    def put_result(self, job_id: str, video: bytes, thumbnail: bytes) -> dict[str, str]:
        """Store the MP4 and its thumbnail (the thumbnail first); returns their keys by variant."""
        keys = {}
        for variant, data in (("thumbnail", thumbnail), ("video", video)):
            keys[variant] = self.result_key(job_id, variant)
            self.store.put(keys[variant], data, _RESULT_FILES[variant][1])
        return keys

    def stale_jobs(self, now: float, stale_after_s: float) -> list[Job]:
        """Active jobs whose last heartbeat (or creation, if none) is more than `stale_after_s` old."""
        stale = []
        for job_id in self.active_ids():
            try:
                job = self.get(job_id)
            except KeyError:  # being created, or deleted since it was listed
                continue
            last = job.created_at if job.heartbeat_at is None else job.heartbeat_at
            if not job.terminal and now - last > stale_after_s:
                stale.append(job)
        return stale

    def claim(self, job: Job, owner: str, now: float) -> Job:
        """Make `owner` the job's owner (heartbeat now, one more attempt), save and return it."""
        job.owner = owner
        job.heartbeat_at = now
        job.attempts += 1
        self.save(job)
        return job
