"""A job's progress as Server-Sent Events, read from the events table by any router replica.

Each stored event goes out once with its ``seq`` as the SSE id, so a client that reconnects with
``Last-Event-ID`` misses nothing and sees nothing twice. Between events the stream sends a comment at
least every ``keepalive_s`` (a DiT step can outlast a load balancer's idle timeout), the queue position
while the job waits, and for a job created by a streaming request it keeps the job alive: such a job is
cancelled when no client has streamed it for ``grace_s``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

from pusa_jobs.job_store import JobStore
from pusa_jobs.jobs import TERMINAL

KEEPALIVE = ": keep-alive\n\n"


def sse(event: str, data: dict, event_id: int | None = None) -> str:
    """One SSE frame."""
    head = "" if event_id is None else f"id: {event_id}\n"
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"


async def job_events(jobs: JobStore, job_id: str, after: int, *, poll_s: float, keepalive_s: float,
                     grace_s: float, present: Callable[[dict], dict] = lambda event: event) -> AsyncIterator[str]:
    """SSE frames of the job's events after seq `after` (each as `present` shows it), until its final
    event (or it is deleted)."""
    now = time.monotonic()
    last_sent, last_watch, last_position = now, float("-inf"), None
    watch_every = min(keepalive_s, grace_s / 3)
    while True:
        job, events = await asyncio.to_thread(jobs.poll, job_id, after)
        if job is None:
            return
        for event in events:
            after = event["seq"]
            yield sse(event["type"], present(event), event["seq"])
            if event["type"] in TERMINAL:  # a job's last event has its final status as type
                return
        if job.terminal:  # its final event was sent before `after`
            return
        now = time.monotonic()
        if events:
            last_sent = now
        if job.status == "queued":
            position = await asyncio.to_thread(jobs.queue_position, job)
            if position != last_position:
                last_position = position
                yield sse("queued", {"type": "queued", "position": position})
                last_sent = now
        if job.abandon_at is not None and now - last_watch >= watch_every:
            # the client may leave right after a renewal: the deadline must still be grace_s after that
            await asyncio.to_thread(jobs.keep_watching, job_id, grace_s + watch_every)
            last_watch = now
        if now - last_sent >= keepalive_s:
            yield KEEPALIVE
            last_sent = now
        await asyncio.sleep(poll_s)
