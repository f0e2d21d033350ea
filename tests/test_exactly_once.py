"""A job is never lost, doubled or stranded: `JobRun` and the real `JobStore` on SQLite and on PostgreSQL, with
fake stages (deterministic arithmetic in place of the models, the blob store a folder), so every scenario is
exact and takes a fraction of a second. Runners are taken over, killed and cut off from the database at chosen
points; each scenario checks the job's row, its events, its checkpoints and its final "video" against an
uninterrupted run.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError

from deployments.job_run import JobRun, RunContext
from deployments.runner import RunnerSettings
from pusa_jobs.db import Database, open_database
from pusa_jobs.job_files import JobFiles
from pusa_jobs.job_store import JobStore, Lease, LeaseLost
from pusa_jobs.jobs import Job, job_created_at, job_plan, new_job_id
from pusa_jobs.schema import batches as batches_table
from pusa_jobs.schema import job_events, jobs, webhook_deliveries
from pusa_jobs.storage import open_store
from pusa_model.presets import get_preset
from pusa_model.request import parse_request, plan_request

STEPS = 3
SHORT = {"prompt": "a cat", "frames": 9, "steps": STEPS, "seed": 3}
LONG = {"prompt": "a long walk", "frames": 25, "window_frames": 17, "steps": STEPS, "seed": 5}  # 3 windows
HOOK = "http://hooks.example/pusa"


class Killed(BaseException):
    """The runner's process died here: nothing of it runs on (not an `Exception`, so no handler sees it)."""


def dropped() -> OperationalError:
    """What a write on a connection the database dropped raises."""
    return OperationalError("UPDATE jobs ...", {}, Exception("server closed the connection unexpectedly"))


class FakeStages:
    """The stages as exact arithmetic: a window's latents are its conditioning (without one, its seed's
    "noise"), then each step k maps x to ``x * 1.5 + k + 1``; a window's frames are its latents doubled; the
    video is every window's frames.
    `before(name, args)` runs first in every call (to fail it, or act at a chosen point)."""

    def __init__(self, files: JobFiles) -> None:
        self.files = files
        self.before: Callable[[str, tuple], None] | None = None
        self.calls: list[tuple[str, Any]] = []

    def _hook(self, name: str, *args: Any) -> None:
        self.calls.append((name, args[0] if args else None))
        if self.before is not None:
            self.before(name, args)

    async def encode_text(self, job_id, plan, on_retry):
        self._hook("encode_text")
        return "text"

    async def encode_conditioning(self, job_id, plan, inputs, on_retry):
        self._hook("encode_conditioning")
        return np.full(4, float(plan.seed % 1000), dtype=np.float32)

    async def encode_extension(self, job_id, plan, previous_key, on_retry):
        self._hook("encode_extension", previous_key)
        frames = np.load(io.BytesIO(self.files.store.get(previous_key)), allow_pickle=False)
        return frames[-4:] + 1

    async def step(self, job_id, plan, inp, on_retry):
        k = inp.step
        self._hook("step", k)
        x = inp.latents
        if x is None:
            x = np.full(4, float(inp.seed % 1000), dtype=np.float32) if inp.clean is None else inp.clean
        return (x * 1.5 + k + 1).astype(np.float32)

    async def decode_window(self, job_id, window, plan, latents, on_retry):
        frames = np.concatenate([latents, latents]) * 2
        self.files.put_window(job_id, window, frames.tobytes(), frames)
        self._hook("decode_window", window)  # after the window's frames are stored

    async def stitch(self, job_id, plan, on_retry):
        self._hook("stitch")
        frames = [np.load(io.BytesIO(self.files.store.get(self.files.window_frames_key(job_id, i))))
                  for i in range(len(plan.windows))]
        self.files.put_result(job_id, np.concatenate(frames).tobytes(), b"thumbnail")

    async def decode(self, job_id, plan, latents, on_retry):
        self._hook("decode")
        self.files.put_result(job_id, (latents * 2).tobytes(), b"thumbnail")


class Cluster:
    """One job database and store, shared by any number of runners (holders)."""

    def __init__(self, database_url: str, tmp_path: Path, **settings: Any) -> None:
        self.db: Database = open_database(database_url)
        self.jobs = JobStore(self.db, lease_ttl_s=30)
        self.files = JobFiles(open_store(str(tmp_path / "store")))
        self.stages = FakeStages(self.files)
        self.settings = RunnerSettings(**{"outage_s": 5.0, **settings})

    def ctx(self, jobs: JobStore | None = None) -> RunContext:
        return RunContext(jobs=jobs or self.jobs, files=self.files, stages=self.stages, settings=self.settings,
                          preset="tiny", retention_s=3600, webhook_url=HOOK, draining=asyncio.Event())

    def submit(self, request: dict, created_at: float | None = None) -> str:
        plan = plan_request(parse_request(request), get_preset("tiny"))
        job_id = new_job_id(created_at)
        self.jobs.create(Job(id=job_id, created_at=job_created_at(job_id), request=plan.request.model_dump(),
                             plan=job_plan(plan)), {"type": "queued"})
        return job_id

    def run(self, lease: Lease, jobs: JobStore | None = None) -> JobRun:
        run = JobRun(self.ctx(jobs), lease)
        asyncio.run(run.run())
        return run

    def expire_leases(self) -> None:
        with self.db.write() as conn:
            conn.execute(update(jobs).where(jobs.c.lease_expires_at.is_not(None)).values(lease_expires_at=0.0))

    def events(self, job_id: str) -> list[dict]:
        return self.jobs.events_after(job_id, -1)

    def types(self, job_id: str) -> list[str]:
        return [e["type"] for e in self.events(job_id)]

    def video(self, job_id: str) -> bytes:
        return self.files.store.get(self.files.result_key(job_id, "video"))

    def checkpoints(self, job_id: str) -> list[str]:
        return sorted(k for k in self.files.store.list(f"checkpoints/{job_id}/") if "/e" in k)

    def webhooks(self, job_id: str) -> list[str]:
        with self.db.read() as conn:
            return list(conn.execute(select(webhook_deliveries.c.event_type)
                                     .where(webhook_deliveries.c.job_id == job_id)).scalars())

    def reference(self, request: dict) -> bytes:
        """The video of an uninterrupted run of `request`."""
        job_id = self.submit(request)
        self.run(self.jobs.claim("reference"))
        assert self.jobs.get(job_id).status == "completed"
        return self.video(job_id)


@pytest.fixture
def cluster(database_url: str, tmp_path: Path):
    c = Cluster(database_url, tmp_path)
    yield c
    c.db.dispose()


class Faulty(JobStore):
    """A holder's view of the job store whose writes can be made to fail: `fault(method, event)` runs before
    each write and may raise (the write then never reaches the database)."""

    def __init__(self, jobs: JobStore, fault: Callable[[str, dict | None], None]) -> None:
        super().__init__(jobs.db, jobs.lease_ttl_s)
        self.fault = fault

    def record(self, lease, event=None, **changes):
        self.fault("record", event)
        return super().record(lease, event, **changes)

    def finish(self, lease, status, event, **kwargs):
        self.fault("finish", event)
        return super().finish(lease, status, event, **kwargs)


# -- 1. a fenced-out holder is never told its write succeeded ----------------------------------------


def test_a_write_retried_after_a_takeover_is_not_acknowledged(cluster: Cluster) -> None:
    """A's write is lost with its connection; A's lease expires, B claims the job and writes its first event;
    A's retry (the same write) must fail with `LeaseLost`, for a step and for the final write."""
    store = cluster.jobs
    job_id = cluster.submit(SHORT)
    a = store.claim("r1")
    store.record(a, {"type": "encoding"})
    store.record(a, {"type": "step", "step": 1}, checkpoint_step=1, checkpoint_key="ck-a1")
    # A's next write never reached the database; meanwhile its lease expired and B took the job over
    cluster.expire_leases()
    b = store.claim("r2")
    store.record(b, {"type": "queued", "requeued": True, "resume_step": 1})
    with pytest.raises(LeaseLost):
        store.record(a, {"type": "step", "step": 2}, checkpoint_step=2, checkpoint_key="ck-a2")
    with pytest.raises(LeaseLost):
        store.finish(a, "completed", {"type": "completed"}, retention_s=60)
    with pytest.raises(LeaseLost):
        store.release(a, {"type": "released", "step": 1})
    row = store.get(job_id)
    assert (row.status, row.lease_holder, row.checkpoint_key) == ("in_progress", "r2", "ck-a1")
    assert cluster.types(job_id) == ["queued", "encoding", "step", "queued"]
    store.record(b, {"type": "encoding"})  # B's lease is intact


def test_a_write_committed_without_acknowledgement_is_recognised_once(cluster: Cluster) -> None:
    """A write whose commit's acknowledgement was lost is recognised when retried, by its own id, while the
    holder still holds the lease; once another runner took the job over, the same retry is refused."""
    store = cluster.jobs
    job_id = cluster.submit(SHORT)
    a = store.claim("r1")
    store.record(a, {"type": "step", "step": 1}, progress=10)
    a.version -= 1  # the acknowledgement was lost: the holder retries the same write
    store.record(a, {"type": "step", "step": 1}, progress=10)
    assert a.version == 2 and cluster.types(job_id) == ["queued", "step"]

    store.record(a, {"type": "step", "step": 2}, progress=20)
    a.version -= 1  # committed, unacknowledged; then the lease lapsed and B claimed the job
    cluster.expire_leases()
    b = store.claim("r2")
    with pytest.raises(LeaseLost):
        store.record(a, {"type": "step", "step": 2}, progress=20)
    store.record(b, {"type": "queued", "requeued": True})
    assert cluster.types(job_id) == ["queued", "step", "step", "queued"]


@pytest.mark.parametrize("lost", ["step", "finish"])
def test_a_runner_fenced_out_while_retrying_keeps_its_hands_off_the_new_holders_checkpoint(cluster: Cluster,
                                                                                          lost: str) -> None:
    """Runner A's write fails on a dropped connection; before its retry, B takes the job over and writes. A
    must stop without deleting the checkpoint B resumes from (nor, for a lost final write, every checkpoint),
    and B then completes the job to the same video as an uninterrupted run."""
    reference = cluster.reference(LONG)
    job_id = cluster.submit(LONG)
    a = cluster.jobs.claim("r1")
    taken: list[Lease] = []

    def takeover(method: str, event: dict | None) -> None:
        if taken or not (method == "record" and event and event.get("step") == 2 if lost == "step"
                         else method == "finish"):
            return
        cluster.expire_leases()
        b = cluster.jobs.claim("r2")
        cluster.jobs.record(b, {"type": "queued", "requeued": True, "resume_step": b.job.checkpoint_step})
        taken.append(b)
        raise dropped()

    cluster.run(a, Faulty(cluster.jobs, takeover))
    assert taken, "the takeover never happened"
    b = taken[0]
    row = cluster.jobs.get(job_id)
    assert (row.status, row.lease_holder, row.lease_epoch) == ("in_progress", "r2", b.epoch)
    assert row.checkpoint_key in cluster.checkpoints(job_id)  # B's resume point is still there
    cluster.run(b)
    done = cluster.jobs.get(job_id)
    assert done.status == "completed", done.error
    assert cluster.types(job_id).count("completed") == 1 and cluster.webhooks(job_id) == ["video.completed"]
    assert cluster.video(job_id) == reference


def test_a_runner_fenced_out_after_the_job_was_deleted_leaves_no_file_behind(cluster: Cluster) -> None:
    """Runner A's lease lapses mid-step; B adopts the job, which is deleted, so B ends it and removes its
    files and row. A then stores its step's checkpoint and is told LeaseLost: it removes that file too (no
    row is left, so no sweep ever would)."""
    job_id = cluster.submit(LONG)
    a = cluster.jobs.claim("r1")
    taken: list[str] = []

    def takeover(name: str, args: tuple) -> None:
        if name == "step" and args[0] == 1 and not taken:  # A computes step 2; its checkpoint comes after
            taken.append("r2")
            cluster.expire_leases()
            assert cluster.jobs.request_delete(job_id) is False  # running: its holder removes it
            b = cluster.jobs.claim("r2")
            with ThreadPoolExecutor(1) as pool:  # B's event loop, while A's waits in its step
                pool.submit(cluster.run, b).result()

    cluster.stages.before = takeover
    cluster.run(a)
    assert taken and cluster.files.store.list(f"results/{job_id}/") == []
    with cluster.db.read() as conn:
        assert conn.execute(select(func.count()).select_from(jobs).where(jobs.c.id == job_id)).scalar_one() == 0
    assert cluster.files.store.list(f"checkpoints/{job_id}/") == []
    assert cluster.webhooks(job_id) == ["video.cancelled"]


# -- 2. a job whose run gave up is not stranded in progress -----------------------------------------


def _runner(cluster: Cluster, holder: str, runs: dict) -> Any:
    """A runner replica's state without Serve: its holder name, store, settings and runs."""
    from deployments.runner import Runner

    bare = type("BareRunner", (Runner.func_or_class,), {"__del__": lambda self: None})  # no drain at GC
    runner = object.__new__(bare)
    runner.holder, runner.jobs, runner.runs = holder, cluster.jobs, runs
    runner.settings = cluster.settings.model_copy(update={"renew_s": 0.02})
    return runner


async def _renew_for(runner, seconds: float) -> None:
    """The replica's lease-renewing loop, for `seconds`."""
    try:
        await asyncio.wait_for(runner._renew(), seconds)
    except asyncio.TimeoutError:
        pass


@pytest.mark.parametrize("adopter", ["r2", "r1"], ids=["another-runner", "the-same-runner"])
@pytest.mark.parametrize("gave_up", ["outage", "unrecorded-failure"])
def test_a_job_whose_run_gave_up_lapses_and_is_adopted(database_url: str, tmp_path: Path, gave_up: str,
                                                       adopter: str) -> None:
    """The run of a job returns while the row still names its runner: after an outage longer than
    ``outage_s``, or when the job's failure cannot be written. The runner goes on renewing the leases of
    the jobs it still runs, but not that one: it lapses, and a runner (another, or this one, which no longer
    runs it) adopts it and completes it."""
    cluster = Cluster(database_url, tmp_path, outage_s=0.3)
    try:
        reference = cluster.reference(SHORT)
        job_id, busy_id = cluster.submit(SHORT), cluster.submit(SHORT)
        lease, busy = cluster.jobs.claim("r1"), cluster.jobs.claim("r1")
        assert (lease.job_id, busy.job_id) == (job_id, busy_id)

        def fault(method: str, event: dict | None) -> None:
            if gave_up == "outage" or method == "finish":
                raise dropped() if gave_up == "outage" else RuntimeError("disk I/O error")
            if event and event["type"] == "step":
                raise ValueError("a bug in a step")  # the job fails, and its failure cannot be written

        run = cluster.run(lease, Faulty(cluster.jobs, fault))
        assert not run.let_go and cluster.jobs.get(job_id).lease_holder == "r1"  # the run gave up

        async def replica() -> None:
            still_running = asyncio.get_running_loop().create_future()  # the other job's run goes on
            runner = _runner(cluster, "r1", {busy_id: (JobRun(cluster.ctx(), busy), still_running)})
            cluster.expire_leases()
            await _renew_for(runner, 0.2)
            assert not still_running.cancelled()
        asyncio.run(replica())

        assert cluster.jobs.get(busy_id).lease_expires_at > time.time()  # renewed: its run goes on
        assert cluster.jobs.get(job_id).lease_expires_at < time.time()  # lapsed
        assert cluster.jobs.claim("r1", running={busy_id, job_id}) is None  # a job the runner runs: never its own
        adopted = cluster.jobs.claim(adopter, running={busy_id})
        assert adopted is not None and adopted.job_id == job_id and adopted.job.adopted
        cluster.run(adopted)
        done = cluster.jobs.get(job_id)
        assert done.status == "completed" and cluster.video(job_id) == reference
        assert cluster.types(job_id).count("completed") == 1 and cluster.types(job_id).count("failed") == 0
    finally:
        cluster.db.dispose()


# -- 3. nothing is written after a job's end ---------------------------------------------------------


def test_nothing_is_written_with_a_lease_after_its_job_ended(cluster: Cluster) -> None:
    """`finish` ends the lease: the holder's later writes (a step, a release in a drain, a second end) are
    `LeaseLost` and leave the ended job as it is; a retried `finish` whose commit was not acknowledged is
    still recognised."""
    store = cluster.jobs
    job_id = cluster.submit(SHORT)
    lease = store.claim("r1")
    store.record(lease, {"type": "step", "step": 1}, checkpoint_step=1, checkpoint_key="k")
    store.finish(lease, "completed", {"type": "completed", "url": "u"}, retention_s=60, progress=100,
                 webhook={"id": "msg_1", "job_id": job_id, "event_type": "video.completed", "url": HOOK,
                          "payload": "{}", "state": "pending", "created_at": 0.0, "next_attempt_at": 0.0})
    ended = store.get(job_id)
    for write in (lambda: store.record(lease, {"type": "step", "step": 2}),
                  lambda: store.release(lease, {"type": "released", "step": 1}),
                  lambda: store.finish(lease, "failed", {"type": "failed"}, error={"code": "x"}, retention_s=60)):
        with pytest.raises(LeaseLost):
            write()
    assert store.get(job_id) == ended and ended.status == "completed"
    assert cluster.types(job_id) == ["queued", "step", "completed"] and cluster.webhooks(job_id) == ["video.completed"]
    lease.version -= 1  # the end's acknowledgement was lost: its retry is recognised, nothing is doubled
    store.finish(lease, "completed", {"type": "completed", "url": "u"}, retention_s=60)
    assert cluster.types(job_id) == ["queued", "step", "completed"] and cluster.webhooks(job_id) == ["video.completed"]


@pytest.mark.parametrize("failure", [PermissionError("store: access denied"), ValueError("bad key")],
                         ids=["store-error", "bug"])
def test_a_cleanup_that_fails_after_the_end_does_not_fail_the_job(cluster: Cluster, monkeypatch, failure) -> None:
    job_id = cluster.submit(SHORT)

    def delete_checkpoints(job_id: str) -> None:
        raise failure

    monkeypatch.setattr(cluster.files, "delete_checkpoints", delete_checkpoints)
    run = cluster.run(cluster.jobs.claim("r1"))
    job = cluster.jobs.get(job_id)
    assert run.let_go and (job.status, job.error, job.progress) == ("completed", None, 100)
    assert cluster.types(job_id)[-1] == "completed" and "failed" not in cluster.types(job_id)
    assert cluster.webhooks(job_id) == ["video.completed"]


def test_a_drain_during_the_final_write_appends_nothing_after_it(cluster: Cluster) -> None:
    """The runner drains while the job's final write is in flight: the run is cancelled, the write lands,
    and no `released` follows the end."""
    job_id = cluster.submit(SHORT)
    ctx = cluster.ctx()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        run = JobRun(ctx, cluster.jobs.claim("r1"))
        task = asyncio.ensure_future(run.run())

        def drain_now(method: str, event: dict | None) -> None:  # in the write's thread, before it commits
            if method == "finish":
                ctx.draining.set()
                loop.call_soon_threadsafe(task.cancel)
                time.sleep(0.3)

        run.ctx = RunContext(**{**ctx.__dict__, "jobs": Faulty(cluster.jobs, drain_now)})
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    job = cluster.jobs.get(job_id)
    assert (job.status, job.lease_holder) == ("completed", None)
    assert cluster.types(job_id)[-1] == "completed" and "released" not in cluster.types(job_id)
    assert cluster.webhooks(job_id) == ["video.completed"]


# -- 4. a resumed long video runs every window's steps -----------------------------------------------


@pytest.mark.parametrize("window", [0, 1])
def test_a_runner_killed_after_a_windows_frames_but_before_its_segment_event_resumes_to_the_same_video(
        cluster: Cluster, window: int) -> None:
    """The runner dies right after window `window`'s frames are stored, before its `segment` event. The next
    runner skips decoding that window again but runs every step of the next ones: every step and every
    segment is reported once, and the video equals an uninterrupted run's."""
    reference = cluster.reference(LONG)
    job_id = cluster.submit(LONG)

    def kill(name: str, args: tuple) -> None:
        if name == "decode_window" and args[0] == window:
            raise Killed()

    cluster.stages.before = kill
    with pytest.raises(Killed):
        cluster.run(cluster.jobs.claim("r1"))
    assert cluster.jobs.get(job_id).checkpoint_step == (window + 1) * STEPS
    assert "segment" not in cluster.types(job_id)[-1:]
    cluster.stages.before = None
    cluster.stages.calls.clear()
    cluster.expire_leases()
    cluster.run(cluster.jobs.claim("r2"))

    job, events = cluster.jobs.get(job_id), cluster.events(job_id)
    assert job.status == "completed", job.error
    assert [e["step"] for e in events if e["type"] == "step"] == list(range(1, 3 * STEPS + 1))
    assert [e["segment"] for e in events if e["type"] == "segment"] == [0, 1, 2]
    assert [args for name, args in cluster.stages.calls if name == "decode_window"] == list(range(window + 1, 3))
    assert sum(name == "step" for name, _ in cluster.stages.calls) == (2 - window) * STEPS
    assert cluster.video(job_id) == reference


# -- 5. a job cancelled while queued is kept, announced and swept like any ended job -------------------


@pytest.mark.parametrize("how", ["cancel", "delete"])
def test_a_job_cancelled_while_queued_expires_and_is_announced(cluster: Cluster, how: str) -> None:
    store = JobStore(cluster.db, retention_s=0.2, webhook_url=HOOK)  # as the routers make it
    mine = "https://example.com/my-hook"
    default_id, own_id = cluster.submit(SHORT), cluster.submit(SHORT)
    with cluster.db.write() as conn:
        conn.execute(update(jobs).where(jobs.c.id == own_id).values(webhook_url=mine))
    before = time.time()
    for job_id in (default_id, own_id):
        if how == "cancel":
            store.request_cancel(job_id)
        else:
            assert store.request_delete(job_id) is True
    with cluster.db.read() as conn:
        rows = {r.id: r for r in conn.execute(select(jobs).where(jobs.c.id.in_([default_id, own_id])))}
        hooks = {(r.job_id, r.event_type, r.url) for r in conn.execute(select(webhook_deliveries))}
    for job_id in (default_id, own_id):
        assert rows[job_id].status == "cancelled" and before + 0.2 <= rows[job_id].expires_at <= time.time() + 0.2
    assert hooks == {(default_id, "video.cancelled", HOOK), (own_id, "video.cancelled", mine)}
    store.request_cancel(default_id)  # again: ended already, nothing more
    assert cluster.webhooks(default_id) == ["video.cancelled"]
    assert cluster.types(default_id) == ["queued", "cancelled"]
    time.sleep(0.3)
    assert sorted(store.expired()) == sorted([default_id, own_id])  # swept with its events and inputs
    for job_id in (default_id, own_id):
        assert store.delete_expired(job_id)
    with cluster.db.read() as conn:
        assert conn.execute(select(func.count()).select_from(job_events)
                            .where(job_events.c.job_id.in_([default_id, own_id]))).scalar_one() == 0
    assert store.claim("r1") is None


def test_a_job_cancelled_while_queued_without_a_receiver_queues_no_webhook(cluster: Cluster) -> None:
    job_id = cluster.submit(SHORT)
    JobStore(cluster.db, retention_s=60).request_cancel(job_id)
    assert cluster.jobs.get(job_id).expires_at is not None and cluster.webhooks(job_id) == []


# -- 6. listing pages through every job exactly once -------------------------------------------------


def _batch_run(cluster: Cluster, created_at: float, rows: int):
    """A `BatchRun` of a batch created at `created_at` (full precision, as the API stamps it; its row
    inserted, unclaimed) whose `rows` rows all completed in the pipeline (their files and records in the
    store)."""
    from deployments.batch_run import BatchContext, BatchRun
    from pusa_jobs.batches import BATCH_PREFIX, Batch, BatchLease, BatchStore
    from pusa_jobs.jobs import new_id
    from pusa_batch.run import BatchSettings

    batch = Batch(id=new_id(BATCH_PREFIX, created_at), owner="alice", endpoint="/v1/videos", input_file_id="file-x",
                  completion_window="24h", status="in_progress", cost_gpu_s=1.0, total=rows, created_at=created_at,
                  expires_at=created_at + 86400)
    ctx = BatchContext(batches=BatchStore(cluster.db), jobs=cluster.jobs, files=cluster.files,
                       settings=BatchSettings(), preset="tiny", retention_s=3600, renew_s=1.0, draining=asyncio.Event())
    ctx.batches.create(batch)
    run = BatchRun(ctx, BatchLease(batch=batch, holder="r1", epoch=1))
    run.rows = [{"custom_id": f"row-{i}", "prompt": "a cat", "frames": 9, "steps": 2} for i in range(rows)]
    run.row_of = {row["custom_id"]: row for row in run.rows}
    for i, row in enumerate(run.rows):
        for folder, ext in (("videos", "mp4"), ("thumbnails", "webp")):
            cluster.files.store.put(f"{run.prefix}/{folder}/{row['custom_id']}.{ext}", b"data")
        cluster.files.store.put(f"{run.prefix}/rows/{row['custom_id']}.json",
                                json.dumps({"custom_id": row["custom_id"], "status": "completed", "seed": i}).encode())
    return run


def _pages(list_page: Callable[..., list], order: str, limit: int = 5) -> list[str]:
    """Every id, page by page (each page after the last id of the one before), until an empty page."""
    seen: list[str] = []
    while page := [item.id for item in list_page(limit=limit, after=seen[-1] if seen else None, order=order)]:
        seen += page
        assert len(seen) < 200, "paging does not end"
    return seen


def test_listing_pages_through_jobs_of_one_millisecond_and_of_a_batch_exactly_once(cluster: Cluster) -> None:
    t0 = 1_760_000_000.0
    store = cluster.jobs
    made = [cluster.submit(SHORT, t0 + 0.0005) for _ in range(4)]  # one millisecond, four jobs
    made += [store.create(Job(id=new_job_id(t0 + 0.001), owner="", created_at=t0 + 0.0014, request={"prompt": "x"},
                              plan={"frames": 9, "fps": 16, "width": 64, "height": 64}), {"type": "queued"}).id]
    run = _batch_run(cluster, t0 + 0.0017, rows=12)  # its videos' ids carry t0 + 1 ms
    made += [run._register({"custom_id": row["custom_id"], "status": "completed", "seed": 1}).id for row in run.rows]
    made += [cluster.submit(SHORT, t0 + 0.002 + i * 0.001) for i in range(3)]
    everyone = sorted(made, key=lambda job_id: (job_created_at(job_id), job_id))
    for owner in (None, "alice"):
        expected = [job_id for job_id in everyone if owner is None or store.get(job_id).owner == owner]

        def page(**kwargs: Any) -> list[Job]:
            return store.list(owner=owner, **kwargs)

        assert _pages(page, "asc") == expected
        assert _pages(page, "desc") == expected[::-1]
    for job_id in made:
        assert store.get(job_id).created_at == job_created_at(job_id)


def test_listing_pages_through_files_and_batches_exactly_once(cluster: Cluster) -> None:
    from pusa_jobs.batches import BATCH_PREFIX, FILE_PREFIX, Batch, BatchStore, StoredFile
    from pusa_jobs.jobs import new_id

    batches = BatchStore(cluster.db)
    t0 = 1_760_000_000.0
    for i in range(12):  # ids and times stamped a little apart, as the API does
        at = t0 + i // 4 * 0.001 + 0.0003
        batches.add_file(StoredFile(id=new_id(FILE_PREFIX, at), owner="o", purpose="batch", filename="in.jsonl",
                                    bytes=1, created_at=at + 0.0002, key="k"))
        batches.create(Batch(id=new_id(BATCH_PREFIX, at), owner="o", endpoint="/v1/videos", input_file_id="f",
                             completion_window="24h", status="validating", cost_gpu_s=1.0, total=1, created_at=at,
                             expires_at=at + 86400))
    for list_page in (lambda **kw: batches.list_files(owner="o", **kw), lambda **kw: batches.list(owner="o", **kw)):
        ids = sorted(item.id for item in list_page(limit=100, after=None, order="asc"))
        assert len(ids) == 12
        assert _pages(list_page, "asc") == ids and _pages(list_page, "desc") == ids[::-1]


def test_upgrade_gives_rows_stamped_apart_from_their_id_the_ids_time(database_url: str) -> None:
    from alembic import command
    from sqlalchemy import insert

    from pusa_jobs.db import alembic_config, migrate

    db = Database(database_url)
    try:
        with db.write() as conn:
            config = alembic_config(db)
            config.attributes["connection"] = conn
            command.upgrade(config, "0005")
        t0 = 1_760_000_000.0
        batch_made, online = new_job_id(t0), new_job_id(t0 + 0.002)
        with db.write() as conn:  # as a batch registered its videos: the batch's time, at full precision
            for job_id, at in ((batch_made, t0 + 0.0007), (online, job_created_at(online))):
                conn.execute(insert(jobs).values(id=job_id, owner="", created_at=at, status="completed", model="m",
                                                 request={}, plan={}, inputs={}))
        migrate(db)
        store = JobStore(db)
        assert [store.get(j).created_at for j in (batch_made, online)] == [t0, job_created_at(online)]
        assert _pages(lambda **kw: store.list(owner=None, **kw), "desc", limit=1) == [online, batch_made]
    finally:
        db.dispose()


# -- 7. a brief outage at a batch's row boundary does not fail the batch --------------------------------


def test_a_brief_outage_when_a_batch_row_ends_is_waited_out(cluster: Cluster, monkeypatch) -> None:
    from pusa_jobs.batches import BatchStore
    from pusa_jobs.storage import StoreUnavailable

    run = _batch_run(cluster, time.time(), rows=2)
    batches = run.ctx.batches
    run.lease = batches.claim("r1")
    failures: list[str] = []

    def once(name: str, fn: Callable, error: Callable[[], Exception]) -> Callable:
        def flaky(*args, **kwargs):
            if name not in failures:
                failures.append(name)
                raise error()
            return fn(*args, **kwargs)
        return flaky

    monkeypatch.setattr(cluster.files.store, "get", once("store.get", cluster.files.store.get,
                                                         lambda: StoreUnavailable("store: connection reset")))
    monkeypatch.setattr(cluster.jobs, "create", once("jobs.create", cluster.jobs.create, dropped))
    monkeypatch.setattr(batches, "update", once("batches.update", BatchStore.update.__get__(batches), dropped))
    run._on_record({"custom_id": "row-0", "status": "completed", "seed": 1})
    run._on_record({"custom_id": "row-1", "status": "failed", "seed": 2})
    assert failures == ["store.get", "jobs.create", "batches.update"]
    got = batches.get(run.batch.id)
    assert (got.completed, got.failed) == (1, 1)
    assert [j.id for j in cluster.jobs.list(owner="alice")] == [run._register({"custom_id": "row-0"}).id]

    monkeypatch.setattr(batches, "registered", lambda *args: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError):  # not an outage: raised at once
        run._on_record({"custom_id": "row-1", "status": "completed", "seed": 2})


# -- 7. which database errors are waited out ---------------------------------------------------------


def _error(fn: Callable[[], Any]) -> Exception:
    try:
        fn()
    except Exception as exc:
        return exc
    raise AssertionError("no error")


def test_only_database_errors_that_can_pass_are_transient(database_url: str, tmp_path: Path) -> None:
    """An outage, a restart or a busy database is waited out; a read-only database, a full disk or a
    missing table is not (retrying it for ``outage_s`` only delays the error)."""
    from sqlalchemy import create_engine, text

    from pusa_jobs.db import is_transient

    db = open_database(database_url)
    try:
        def write(engine=db.engine, sql="UPDATE jobs SET progress = 1") -> Any:
            with engine.begin() as conn:
                return conn.execute(text(sql))

        missing = _error(lambda: write(sql="UPDATE no_such_table SET x = 1"))
        assert not is_transient(missing), missing
        if db.dialect == "sqlite":
            path = db.url.database
            with db.engine.begin() as holder:  # another writer holds the lock
                holder.exec_driver_sql("UPDATE jobs SET progress = 2")
                impatient = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
                locked = _error(lambda: write(impatient, "UPDATE jobs SET progress = 3"))
                impatient.dispose()
            read_only = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
            readonly = _error(lambda: write(read_only))
            read_only.dispose()

            def fill() -> None:
                with db.engine.begin() as conn:
                    conn.exec_driver_sql("PRAGMA max_page_count = 40")
                    conn.exec_driver_sql("CREATE TABLE filler (x TEXT)")
                    for _ in range(100):
                        conn.exec_driver_sql("INSERT INTO filler VALUES (randomblob(4096))")
            full = _error(fill)
            assert is_transient(locked) and "locked" in str(locked), locked
            assert not is_transient(readonly) and "readonly" in str(readonly), readonly
            assert not is_transient(full) and "full" in str(full), full
        else:
            def terminated() -> None:
                with db.engine.connect() as victim:
                    pid = victim.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
                    with db.engine.connect() as killer:
                        killer.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
                    victim.exec_driver_sql("SELECT 1")

            def read_only() -> None:
                with db.engine.begin() as conn:
                    conn.exec_driver_sql("SET TRANSACTION READ ONLY")
                    conn.exec_driver_sql("UPDATE jobs SET progress = 1")

            lost = _error(terminated)
            assert is_transient(lost), lost
            readonly = _error(read_only)
            assert not is_transient(readonly) and "read-only" in str(readonly), readonly
            unreachable = create_engine("postgresql+psycopg://pusa@127.0.0.1:9/none")
            refused = _error(lambda: write(unreachable))
            assert is_transient(refused), refused

            class Coded(Exception):
                def __init__(self, sqlstate: str) -> None:
                    self.sqlstate = sqlstate

            for sqlstate, transient in (("53100", False), ("25006", False), ("40001", True), ("57P03", True),
                                        ("53300", True), ("42P01", False)):
                assert is_transient(OperationalError("stmt", {}, Coded(sqlstate))) is transient, sqlstate
    finally:
        db.dispose()


def test_a_batch_keeps_renewing_its_lease_while_its_pipeline_ends_after_a_cancel(cluster: Cluster, monkeypatch) -> None:
    """A cancel stops the batch at the next row's end, not at once: until the pipeline returns, the lease is
    still renewed, so no other runner takes the batch while its rows in flight finish."""
    import deployments.batch_run as batch_run

    run = _batch_run(cluster, time.time(), rows=1)
    run.ctx.renew_s = 0.05
    renewals: list[float] = []
    monkeypatch.setattr(run.ctx.batches, "update", lambda lease, **changes: renewals.append(time.monotonic()))
    stopped: list[float] = []

    def pipeline(*args: Any, **kwargs: Any) -> None:
        run._stop("cancelled")  # asked while a row is in flight
        stopped.append(time.monotonic())
        time.sleep(0.6)  # the row in flight ends

    monkeypatch.setattr(batch_run, "run_batch", pipeline)
    asyncio.run(run._generate())
    assert len([t for t in renewals if t > stopped[0]]) >= 4, renewals
    assert run.stop_reason == "cancelled"


# -- 9. a batch's video deleted during the batch stays deleted; batches and their files are swept -------


def _lines(cluster: Cluster, file_id: str | None) -> list[dict]:
    from pusa_jobs.batches import BatchStore

    if file_id is None:
        return []
    data = cluster.files.store.get(BatchStore(cluster.db).get_file(file_id).key)
    return [json.loads(line) for line in data.decode().splitlines()]


def _delete_video(cluster: Cluster, video_id: str, how: str) -> None:
    """The API's DELETE of an ended video: hidden, then its files and row removed (``half``: the replica
    died after hiding it; the sweep removes the rest once its retention is over)."""
    assert cluster.jobs.request_delete(video_id) is True
    if how == "whole":
        cluster.files.delete_all(video_id)
        cluster.jobs.delete(video_id)


@pytest.mark.parametrize("how", ["whole", "half"])
def test_a_video_deleted_during_its_batch_is_not_made_again(cluster: Cluster, how: str) -> None:
    """Every row's video is registered as it ends; the owner deletes one (wholly, or the deletion cut short)
    while the batch runs; the runner that takes the batch over registers every completed row again at the
    end. The deleted video is not made again and the batch completes, the row in its error file as
    ``video_deleted`` (counted completed: it was made)."""
    from deployments.batch_run import BatchRun
    from pusa_jobs.batches import BatchLease

    run = _batch_run(cluster, time.time(), rows=3)
    batches = run.ctx.batches
    run.lease = batches.claim("r1")
    for row in run.rows:
        run._on_record({"custom_id": row["custom_id"], "status": "completed", "seed": 1})
    videos = {row["custom_id"]: run._register({"custom_id": row["custom_id"]}).id for row in run.rows}
    _delete_video(cluster, videos["row-1"], how)

    with batches.db.write() as conn:  # the first runner is lost; its lease lapses
        conn.execute(update(batches_table).values(lease_expires_at=0.0))
    taken = BatchRun(run.ctx, batches.claim("r2"))
    taken.rows, taken.row_of = run.rows, run.row_of
    taken._finish()

    batch = batches.get(run.batch.id)
    assert batch.status == "completed" and (batch.completed, batch.failed) == (3, 0), batch
    assert [line["custom_id"] for line in _lines(cluster, batch.output_file_id)] == ["row-0", "row-2"]
    assert [(line["custom_id"], line["error"]["code"]) for line in _lines(cluster, batch.error_file_id)] == \
        [("row-1", "video_deleted")]
    with pytest.raises(KeyError):
        cluster.jobs.get(videos["row-1"])
    if how == "whole":
        assert cluster.jobs.peek(videos["row-1"]) is None
        assert cluster.files.store.list(f"results/{videos['row-1']}/") == []
    assert sorted(job.id for job in cluster.jobs.list(owner="alice")) == sorted([videos["row-0"], videos["row-2"]])
    assert BatchRun(run.ctx, BatchLease(batch=batch, holder="r1", epoch=1))._register({"custom_id": "row-1"}) is None


def test_a_fenced_out_runner_racing_a_deletion_leaves_no_video(cluster: Cluster, monkeypatch) -> None:
    """A runner that lost the batch found a row unregistered, then the new holder registered it and the
    owner deleted it before the first one's registration went through: that one stores the files again,
    finds the row registered, and removes them (no video, no files)."""
    run = _batch_run(cluster, time.time(), rows=1)
    video_id = run._register({"custom_id": "row-0", "seed": 1}).id
    _delete_video(cluster, video_id, "whole")
    monkeypatch.setattr(run.ctx.batches, "registered", lambda *args: False)  # it looked before the others acted
    assert run._register({"custom_id": "row-0", "seed": 1}) is None
    assert cluster.jobs.peek(video_id) is None and cluster.files.store.list(f"results/{video_id}/") == []


def test_an_ended_batch_its_files_and_inputs_are_swept_after_retention(cluster: Cluster) -> None:
    """A batch's retention starts when it ends; then the runners' sweep deletes it with everything it stored
    (its requests, the pipeline's outputs, its output and error files) and an uploaded input file after its
    own; a batch still running and its videos (jobs with their own retention) are not touched."""
    from deployments.batch_run import manifest_key
    from pusa_jobs.batches import FILE_PREFIX, StoredFile, batch_folder
    from pusa_jobs.jobs import new_id
    from pusa_jobs.retention import sweep_expired
    from pusa_jobs.schema import batch_videos, files

    def sweep():
        return sweep_expired(cluster.jobs, batches, cluster.files)

    run = _batch_run(cluster, time.time(), rows=2)
    batches = run.ctx.batches
    upload_id = new_id(FILE_PREFIX)
    batches.add_file(StoredFile(id=upload_id, owner="alice", purpose="batch", filename="in.jsonl", bytes=5,
                                created_at=time.time(), key=f"files/{upload_id}", expires_at=time.time() + 3600))
    cluster.files.store.put(f"files/{upload_id}", b"input")
    cluster.files.store.put(manifest_key(run.batch.id), b"requests")
    running = _batch_run(cluster, time.time() + 1, rows=1)
    run.lease = batches.claim("r1")
    for row in run.rows:
        run._on_record({"custom_id": row["custom_id"], "status": "completed", "seed": 1})
    before = time.time()
    run._finish()

    batch = batches.get(run.batch.id)
    assert batch.status == "completed" and before + 3600 <= batch.retention_ends_at <= time.time() + 3600
    outputs = [batches.get_file(batch.output_file_id)]
    assert outputs[0].expires_at == batch.retention_ends_at
    assert outputs[0].to_openai()["expires_at"] == int(batch.retention_ends_at)
    assert batches.get(running.batch.id).retention_ends_at is None
    assert sweep().batches == [] and batches.get(run.batch.id)  # not yet

    with cluster.db.write() as conn:  # retention passes for every batch, file and job that has one
        conn.execute(update(batches_table).where(batches_table.c.retention_ends_at.is_not(None))
                     .values(retention_ends_at=0.0))
        conn.execute(update(files).where(files.c.expires_at.is_not(None)).values(expires_at=0.0))
    swept = sweep()
    assert (swept.batches, sorted(swept.files), swept.jobs) == \
        ([run.batch.id], sorted([upload_id, batch.output_file_id]), [])
    with pytest.raises(KeyError):
        batches.get(run.batch.id)
    assert cluster.files.store.list(batch_folder(run.batch.id)) == [] and cluster.files.store.list("files/") == []
    with cluster.db.read() as conn:
        assert conn.execute(select(batch_videos.c.custom_id).where(batch_videos.c.batch_id == run.batch.id)).all() == []
    assert len(cluster.jobs.list(owner="alice")) == 2  # the videos: jobs of their own, kept for theirs
    assert batches.get(running.batch.id).status == "in_progress"
    assert cluster.files.store.list(batch_folder(running.batch.id))
    assert sweep() == type(swept)()


def test_a_failed_batch_is_kept_for_the_retention_too(cluster: Cluster) -> None:
    run = _batch_run(cluster, time.time(), rows=1)  # its requests were never stored: reading them fails
    run.lease = run.ctx.batches.claim("r1")
    asyncio.run(run.run())
    batch = run.ctx.batches.get(run.batch.id)
    assert batch.status == "failed" and batch.retention_ends_at is not None, batch
