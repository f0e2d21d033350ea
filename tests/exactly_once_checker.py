"""A seeded fault-injection checker of the exactly-once promises (docs/design.md, "Jobs, leases and
exactly once").

Each *history* drives the real `JobStore`, `JobRun` and the `Runner`'s lease renewal (`_renew_round`,
without Serve) on one database (SQLite or PostgreSQL) and one blob store folder, with the fake
deterministic stages of tests/test_exactly_once.py. Several runners (holders) and an API replica act
on 1-3 jobs of one window or of three (long videos). Every database transaction, blob-store call and stage
call of a holder passes a *point* of the scheduler, which (from a seeded RNG) may first let other actors
act — another runner claims a job and runs it (nested, with faults of its own), a lease expires, the job
is cancelled or deleted, the runner drains (releases after its step, or is cancelled mid-call), a runner
renews its leases, a new job is submitted, a batch registers its rows as videos (its owner deletes some of
them, wholly or cut short, and the batch ends, registering its rows again), a listing pages through the
jobs, the expiry sweep runs (jobs, batches and files); and each run sits in a thread of its own with one
baton between them, so it may also stall there (its process paused) while the others go on, and be
resumed later — and then the point may inject a fault in the call itself: the runner dies before it, during it (the transaction rolled back) or after it committed;
the connection drops before the commit (never applied) or after it (applied, acknowledgement lost); a
database or blob-store outage of several calls (outages longer than ``outage_s`` make the run give up).
Faults wrap the real objects (a `Database` whose ``write``/``read`` fail around the real transaction, a
`Store` that fails around the real call); nothing of the store or the run is re-implemented. Backoff
sleeps and the outage deadline of `JobRun` run on a virtual clock, so a history takes a fraction of a second.

After each history (and at every point, for the ones that must hold all along) the invariants are
checked; see `Checker.check_point` and `Checker.check_end`. A counterexample is reported with its seed
and the history of actions, and `python -m tests.exactly_once_checker --seed N -v` replays it.

    python -m tests.exactly_once_checker --histories 10000 --database sqlite --database postgres
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import random
import sys
import tempfile
import threading
import contextvars
import time
import types
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # test_exactly_once and pgserver, as pytest imports them
    sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
from sqlalchemy import select, update  # noqa: E402
from sqlalchemy.exc import OperationalError  # noqa: E402

from deployments import batch_run as batch_run_module  # noqa: E402
from deployments import job_run as job_run_module  # noqa: E402
from deployments.batch_run import BatchContext, BatchRun  # noqa: E402
from deployments.job_run import JobRun, RunContext  # noqa: E402
from deployments.runner import RunnerSettings  # noqa: E402
from pusa_batch.run import BatchSettings  # noqa: E402
from pusa_jobs.batches import BATCH_PREFIX, Batch, BatchLease, BatchStore, batch_folder  # noqa: E402
from pusa_jobs.db import Database, open_database  # noqa: E402
from pusa_jobs.job_files import JobFiles  # noqa: E402
from pusa_jobs.job_store import JobStore, LeaseLost  # noqa: E402
from pusa_jobs.jobs import ACTIVE, JOB_PREFIX, TERMINAL, Job, job_plan  # noqa: E402
from pusa_jobs.retention import sweep_expired  # noqa: E402
from pusa_jobs.schema import batch_videos, job_events, jobs, webhook_deliveries  # noqa: E402
from pusa_jobs.schema import batches as batches_table  # noqa: E402
from pusa_jobs.schema import files as files_table  # noqa: E402
from pusa_jobs.storage import LocalStore, Store, StoreUnavailable  # noqa: E402
from pusa_model.presets import get_preset  # noqa: E402
from pusa_model.request import parse_request, plan_request  # noqa: E402
from test_exactly_once import HOOK, LONG, SHORT, FakeStages, Killed, dropped  # noqa: E402

REQUESTS = {"short": SHORT, "long": LONG}
RETENTION_S = 3600.0


class Violation(AssertionError):
    """An invariant does not hold."""


class Stop(BaseException):
    """Raised in a run at the point where an invariant broke: the history stops (no handler of the code
    under test sees it)."""


class Counterexample(AssertionError):
    def __init__(self, seed: int, database: str, error: BaseException, history: list[str]) -> None:
        self.seed, self.database, self.error, self.history = seed, database, error, history
        lines = "\n".join(f"  {line}" for line in history)
        super().__init__(f"seed {seed} on {database}: {type(error).__name__}: {error}\nhistory:\n{lines}")


# -- the virtual clock of JobRun's backoff and outage deadline ---------------------------------------


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep_sync(self, delay: float) -> None:
        self.now += delay

    async def sleep(self, delay: float, result: Any = None) -> Any:
        self.now += delay
        await _real_sleep(0)
        return result


_real_sleep = asyncio.sleep
CLOCK = VirtualClock()


class _AsyncioOnTheClock(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


@contextlib.contextmanager
def virtual_clock() -> Iterator[VirtualClock]:
    """`JobRun`'s ``asyncio.sleep`` and ``time.monotonic``, and `BatchRun`'s ``time.sleep`` and
    ``time.monotonic``, on `CLOCK` (everything else as it is)."""
    proxy = _AsyncioOnTheClock("asyncio")
    proxy.sleep = CLOCK.sleep
    clock = types.SimpleNamespace(monotonic=CLOCK.monotonic, time=time.time, sleep=CLOCK.sleep_sync)
    saved = job_run_module.asyncio, job_run_module.time, batch_run_module.time
    job_run_module.asyncio, job_run_module.time, batch_run_module.time = proxy, clock, clock
    try:
        yield CLOCK
    finally:
        job_run_module.asyncio, job_run_module.time, batch_run_module.time = saved


# -- the actors and the wrappers that fail around the real calls ---------------------------------------


class Actor:
    """A runner replica (or the API, `api`): its holder name, its view of the database and the store
    through the fault wrappers, its context, its runs in progress."""

    def __init__(self, checker: Checker, name: str) -> None:
        self.checker, self.name = checker, name
        self.db = FaultyDatabase(checker.db, checker, self)
        self.jobs = JobStore(self.db, lease_ttl_s=30, retention_s=RETENTION_S, webhook_url=HOOK)
        self.files = JobFiles(FaultyStore(checker.store, checker, self))
        self.stages = FakeStages(self.files)
        self.stages.before = lambda name, args: checker.point(self, "stage", name)
        self.ctx = RunContext(jobs=self.jobs, files=self.files, stages=self.stages, settings=checker.settings,
                              preset="tiny", retention_s=RETENTION_S, webhook_url=HOOK, draining=asyncio.Event())
        self.dead = False  # killed: nothing of it runs on
        self.stopped = False  # drained
        self.runs: dict[str, tuple[JobRun, Any, asyncio.AbstractEventLoop]] = {}  # job id: run, task, loop

    @property
    def live(self) -> bool:
        return not self.dead and not self.stopped and not self.ctx.draining.is_set()


class FaultyDatabase:
    """`Database` whose transactions pass the scheduler's point first: it may kill the actor before,
    during (rolled back) or after the commit, or drop the connection before the commit or after it."""

    def __init__(self, inner: Database, checker: Checker, actor: Actor) -> None:
        self.inner, self.checker, self.actor = inner, checker, actor
        self.dialect, self.url, self.engine = inner.dialect, inner.url, inner.engine

    @contextlib.contextmanager
    def write(self) -> Iterator[Any]:
        fault = self.checker.point(self.actor, "db.write")
        if fault in ("kill", "drop"):
            raise Killed() if fault == "kill" else dropped()
        with self.inner.write() as conn:
            yield conn
            if fault == "kill_uncommitted":
                raise Killed()
            if fault == "drop_uncommitted":
                raise dropped()
        if fault == "kill_committed":
            raise Killed()
        if fault == "drop_committed":
            raise dropped()

    @contextlib.contextmanager
    def read(self) -> Iterator[Any]:
        fault = self.checker.point(self.actor, "db.read")
        if fault in ("kill", "drop"):
            raise Killed() if fault == "kill" else dropped()
        with self.inner.read() as conn:
            yield conn

    def dispose(self) -> None:
        pass


class FaultyStore(Store):
    """The blob store through the scheduler's points: unavailable before a call or (for writes) after it
    landed, or the actor killed before or after it."""

    def __init__(self, inner: Store, checker: Checker, actor: Actor) -> None:
        self.inner, self.checker, self.actor = inner, checker, actor

    @property
    def uri(self) -> str:
        return self.inner.uri

    def _call(self, op: str, *args: Any) -> Any:
        fault = self.checker.point(self.actor, f"store.{op}")
        if fault in ("kill", "drop") and op == "delete_prefix":
            self.checker.failed_cleanups.add(args[0].split("/")[1])
        if fault == "kill":
            raise Killed()
        if fault == "drop":
            raise StoreUnavailable(f"store: connection reset ({op})")
        result = getattr(self.inner, op)(*args)
        if op == "put":
            self.checker.writers[args[0]] = self.actor
        if fault == "kill_committed":
            raise Killed()
        if fault == "drop_committed":
            raise StoreUnavailable(f"store: connection reset after {op}")
        return result

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        return self._call("put", key, data, content_type)

    def get(self, key: str) -> bytes:
        return self._call("get", key)

    def exists(self, key: str) -> bool:
        return self._call("exists", key)

    def delete(self, key: str) -> None:
        return self._call("delete", key)

    def list(self, prefix: str = "") -> list[str]:
        return self._call("list", prefix)

    def delete_prefix(self, prefix: str) -> None:
        return self._call("delete_prefix", prefix)

    def url(self, key: str, expires_s: int = 3600) -> str | None:
        return None


class _ThreadsafeTask:
    """A run's task as the `Runner`'s renewal sees it, from the thread of another actor's point."""

    def __init__(self, task: asyncio.Task, loop: asyncio.AbstractEventLoop) -> None:
        self.task, self.loop = task, loop

    def done(self) -> bool:
        return self.task.done()

    def cancel(self) -> None:
        self.loop.call_soon_threadsafe(self.task.cancel)


CURRENT: contextvars.ContextVar[Handle | None] = contextvars.ContextVar("exactly_once_run", default=None)


class Handle:
    """One run of an actor in a thread of its own. Exactly one thread of a history goes at a time (the
    baton): a run may stall at a point (its process paused) and is resumed later by the scheduler."""

    def __init__(self, actor: Actor, n: int) -> None:
        self.actor, self.n = actor, n
        self.go = threading.Event()
        self.parked = threading.Event()
        self.stalled = False
        self.finished = False
        self.claimed: bool | None = None  # whether it claimed a job (None until it tried)
        self.error: BaseException | None = None

    def start(self, fn: Any) -> None:
        """Start `fn()` in this run's thread, and wait until it stalls or ends."""
        def target() -> None:
            CURRENT.set(self)
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - a violation seen in the run, or a checker error
                self.error = exc
            finally:
                self.finished = True
                self.parked.set()

        self.parked.clear()
        threading.Thread(target=target, daemon=True).start()
        self.parked.wait()

    def resume(self) -> None:
        """Let the stalled run go on, and wait until it stalls again or ends."""
        assert self.stalled and not self.finished
        self.parked.clear()
        self.stalled = False
        self.go.set()
        self.parked.wait()

    def stall(self) -> None:
        """Called in the run (at a point): hand the baton back and wait to be resumed."""
        self.go.clear()
        self.stalled = True
        self.parked.set()
        self.go.wait()


def in_thread(fn: Any, *args: Any) -> Any:
    """`fn(*args)` in a thread of its own, waited for (a nested actor runs its own event loop, also from a
    point inside another actor's loop)."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            out["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out.get("result")


# -- one history ---------------------------------------------------------------------------------------


class Checker:
    """Runs history `seed` on `db` and `store`; `run()` raises `Violation` (or any error) on a counterexample."""

    WRITE_FAULTS = ("kill", "kill_uncommitted", "kill_committed", "drop", "drop_uncommitted", "drop_committed",
                    "outage")
    READ_FAULTS = ("kill", "drop", "outage")
    STORE_WRITE_FAULTS = ("kill", "kill_committed", "drop", "drop_committed", "outage")
    STORE_READ_FAULTS = ("kill", "drop", "outage")
    ACTIONS = ("expire", "takeover", "takeover", "nested", "nested", "resume", "resume", "stall", "stall", "stall",
               "cancel", "delete", "drain", "drain_cancel", "renew", "renew", "submit", "batch", "list", "sweep")

    def __init__(self, seed: int, db: Database, store: LocalStore, references: dict[str, bytes],
                 verbose: bool = False) -> None:
        self.seed, self.db, self.store, self.references, self.verbose = seed, db, store, references, verbose
        self.rng = random.Random(seed)
        self.tag = f"h{seed}-{random.Random().getrandbits(32):08x}"  # this history's owner
        self.history: list[str] = []
        rng = self.rng
        self.fault_p = rng.choice((0.0, 0.03, 0.08, 0.15, 0.3))
        self.action_p = rng.choice((0.0, 0.03, 0.08, 0.15))
        self.faults_left = rng.randint(0, 12)
        self.actions_left = rng.randint(0, 10)
        self.settings = RunnerSettings(outage_s=5.0, max_takeovers=rng.choice((1, 3, 100)), checkpoint_every=1,
                                       renew_s=1.0)
        self.outage: dict[str, int] = {}  # "db"/"store": calls it still fails
        self.actors: list[Actor] = []
        self.api = Actor(self, "api")
        self.base = JobStore(db, lease_ttl_s=30, retention_s=RETENTION_S, webhook_url=HOOK)  # the checker's view
        self.files = JobFiles(store)
        self.kind: dict[str, str] = {}  # accepted job id: request kind
        self.deleted: set[str] = set()  # ids whose deletion was requested (and accepted)
        self.swept: set[str] = set()  # ids the sweep removed (their retention over)
        self.batch_jobs: set[str] = set()  # videos a batch registered (ended when made)
        self.batches: dict[str, dict[str, str | None]] = {}  # batch id: {custom id: its video, None if deleted}
        self.ended: dict[str, str] = {}  # job id: the terminal status seen first
        self.depth = 0
        self.handles: list[Handle] = []
        self.writers: dict[str, Actor] = {}  # store key: the actor whose put landed last
        self.failed_cleanups: set[str] = set()  # job ids a removal of whose files failed
        self.violation: BaseException | None = None  # the first one, seen in a run
        self.stats: Counter[str] = Counter()  # faults and actions injected, by kind
        self.t0 = time.time()
        self.created = 0
        for _ in range(rng.randint(2, 3)):
            self.new_actor()

    def log(self, line: str) -> None:
        self.history.append(("  " * self.depth) + line)
        if self.verbose:
            print(self.history[-1], flush=True)

    def new_actor(self) -> Actor:
        actor = Actor(self, f"r{len(self.actors)}")
        self.actors.append(actor)
        return actor

    # -- the scheduler ---------------------------------------------------------------------------------

    def point(self, actor: Actor, op: str, what: str = "") -> str | None:
        """Called before each database transaction, store call and stage call of `actor`: checks the
        invariants that hold all along, may let other actors act, and returns the fault to inject."""
        if actor.dead:
            raise Killed()
        if self.violation is not None:
            raise Stop()
        try:
            self.check_point()
        except Violation as exc:
            self.violation = exc
            raise Stop() from exc
        rng = self.rng
        where = f"{op}{' ' + what if what else ''}"
        if actor is not self.api and self.actions_left and rng.random() < self.action_p and self.depth < 3:
            self.actions_left -= 1
            handle = CURRENT.get()
            action = rng.choice(self.ACTIONS)
            if action == "stall" and handle is not None and handle.actor is actor:
                self.stats["action:stall"] += 1
                self.log(f"{actor.name}#{handle.n} stalls at {where}")
                handle.stall()
                self.log(f"{actor.name}#{handle.n} goes on at {where}")
            elif action != "stall":
                try:
                    self.act(actor, action, where)
                except Violation as exc:  # seen by another actor: the history stops here, as at a check
                    self.violation = exc
                    raise Stop() from exc
            if actor.dead:
                raise Killed()
        area = op.split(".")[0]
        if area in self.outage and self.outage[area] > 0:
            self.outage[area] -= 1
            self.log(f"{actor.name} {op} {what}: {area} outage")
            return "drop" if area != "stage" else None
        if not self.faults_left or rng.random() >= self.fault_p:
            return None
        if op == "stage":
            faults = ("kill",)
        elif actor is self.api:
            faults = ("drop", "drop_committed") if op == "db.write" else ("drop",)
        elif op == "db.write":
            faults = self.WRITE_FAULTS
        elif op == "db.read":
            faults = self.READ_FAULTS
        elif op in ("store.put", "store.delete", "store.delete_prefix"):
            faults = self.STORE_WRITE_FAULTS
        else:
            faults = self.STORE_READ_FAULTS
        fault = rng.choice(faults)
        self.faults_left -= 1
        if fault == "outage":
            self.stats[f"fault:{area}-outage"] += 1
            self.outage[area] = rng.randint(1, 8)
            self.log(f"{actor.name} {op} {what}: {area} outage of {self.outage[area] + 1} calls begins")
            fault = "drop"
        else:
            self.stats[f"fault:{op.split('.')[0]}-{fault}"] += 1
            self.log(f"{actor.name} {op} {what}: {fault}")
        if fault == "kill" and op == "stage":
            actor.dead = True
            raise Killed()
        if fault.startswith("kill"):
            actor.dead = True  # the process dies with this call (before, during or after it)
        return fault

    def act(self, actor: Actor, action: str, where: str) -> None:
        """Another actor acts while `actor` waits at `where`."""
        rng = self.rng
        active = self.active_jobs()
        self.stats[f"action:{action}"] += 1
        if action == "expire" and active:
            job_id = rng.choice(active)
            self.log(f"[while {actor.name} at {where}] lease of {job_id[-6:]} expires")
            self.expire([job_id])
        elif action in ("nested", "takeover"):
            idle = [a for a in self.actors if a.live and a is not actor and not a.runs]
            runner = rng.choice(idle + [actor] if actor.live and actor is not self.api else idle) if idle else None
            if action == "takeover":  # the lease of this actor's job lapses and another runner claims it
                runner = rng.choice(idle) if idle else self.new_actor()
                mine = [job_id for job_id in actor.runs]
                if mine:
                    self.expire(mine)
            if runner is None and len([a for a in self.actors if a.live]) < 4:
                runner = self.new_actor()
            if runner is not None:
                self.log(f"[while {actor.name} at {where}] {action}: {runner.name} claims")
                self.depth += 1
                try:
                    self.start_run(runner)
                finally:
                    self.depth -= 1
        elif action == "resume":
            stalled = [h for h in self.handles if h.stalled]
            if stalled:
                handle = rng.choice(stalled)
                self.log(f"[while {actor.name} at {where}] {handle.actor.name}#{handle.n} resumes")
                self.depth += 1
                try:
                    handle.resume()
                finally:
                    self.depth -= 1
                self.raise_errors()
        elif action in ("cancel", "delete") and self.kind:
            job_id = rng.choice(sorted(self.kind))
            self.log(f"[while {actor.name} at {where}] {action} {job_id[-6:]}")
            self.request(action, job_id)
        elif action in ("drain", "drain_cancel") and actor.runs:
            self.log(f"[while {actor.name} at {where}] {actor.name} drains{' (its runs cancelled)' if action == 'drain_cancel' else ''}")
            actor.ctx.draining.set()
            if action == "drain_cancel":
                for _run, task, loop in actor.runs.values():
                    loop.call_soon_threadsafe(task.cancel)
        elif action == "renew":
            runners = [a for a in self.actors if not a.dead and not a.stopped]
            if runners:
                runner = rng.choice(runners)
                self.log(f"[while {actor.name} at {where}] {runner.name} renews its leases")
                self.renew(runner)
        elif action == "batch":
            self.register_batch_rows()
        elif action == "submit":
            self.log(f"[while {actor.name} at {where}] a job is submitted")
            self.submit()
        elif action == "list":
            self.list_jobs(rng.randint(1, 3), rng.choice(("asc", "desc")), complete=False)
        elif action == "sweep":
            self.log(f"[while {actor.name} at {where}] retention passes; the sweep runs")
            self.sweep()

    # -- actors' deeds ---------------------------------------------------------------------------------

    def submit(self) -> None:
        """The API queues a job (its idempotency key makes a create retried after a lost acknowledgement
        return the job it created)."""
        kind = self.rng.choice(("short", "short", "long"))
        plan = plan_request(parse_request(REQUESTS[kind]), get_preset("tiny"))
        at = self.t0 + self.created // 2 * 0.001  # two jobs a millisecond: listing must tell them apart
        self.created += 1
        job_id = f"{JOB_PREFIX}{int(at * 1000):012x}{self.rng.getrandbits(48):012x}"
        self.files.put_input(job_id, "image", b"input")
        job = Job(id=job_id, owner=self.tag, created_at=at, request=plan.request.model_dump(), plan=job_plan(plan),
                  inputs={"image": f"inputs/{job_id}/image"}, idempotency_key=job_id, request_hash=kind)
        self.kind[job_id] = kind
        for _ in range(50):
            try:
                made = self.api.jobs.create(job, {"type": "queued"})
                break
            except OperationalError:
                continue
        else:
            raise Violation("a create never went through")
        if made.id != job_id:
            raise Violation(f"the retried create of {job_id} returned {made.id}")
        self.log(f"api creates {job_id[-6:]} ({kind})")

    def register_batch_rows(self) -> None:
        """A batch driver registers its completed rows as videos of the batch's owner (`BatchRun._register`;
        ids derived from the batch's, times from its full-precision creation time), through the API's
        faulty connection; a second driver (one that lost the batch) registers some of them again. The
        owner may delete some of the videos (wholly, or hidden only: the API replica died), then the
        batch's holder ends it (`BatchRun._finish`, which registers every completed row again)."""
        rng = self.rng
        at = self.t0 + self.created // 2 * 0.001 + 0.0007
        self.created += 1
        drivers = rng.randint(1, 2)
        batch = Batch(id=f"{BATCH_PREFIX}{int(at * 1000):012x}{rng.getrandbits(48):012x}", owner=self.tag,
                      endpoint="/v1/videos", input_file_id="file-x", completion_window="24h", status="in_progress",
                      cost_gpu_s=1.0, total=3, created_at=at, expires_at=at + 86400, lease_holder=f"d{drivers - 1}",
                      lease_epoch=drivers, lease_expires_at=time.time() + 3600)
        BatchStore(self.db).create(batch)
        ctx = BatchContext(batches=BatchStore(self.api.db), jobs=self.api.jobs, files=self.api.files,
                           settings=BatchSettings(), preset="tiny", retention_s=RETENTION_S, renew_s=1.0,
                           draining=asyncio.Event())
        rows = [{"custom_id": f"row-{i}", "prompt": "a cat", "frames": 9, "steps": 2}
                for i in range(rng.randint(1, 3))]
        videos: dict[str, str | None] = {}
        self.batches[batch.id] = videos
        for driver in range(drivers):
            run = BatchRun(ctx, BatchLease(batch=batch, holder=f"d{driver}", epoch=1 + driver))
            run.rows, run.row_of = rows, {row["custom_id"]: row for row in rows}
            for row in rows:
                for folder, ext in (("videos", "mp4"), ("thumbnails", "webp")):
                    self.store.put(f"{run.prefix}/{folder}/{row['custom_id']}.{ext}", b"batch video")
                self.store.put(f"{run.prefix}/rows/{row['custom_id']}.json",
                               f'{{"custom_id": "{row["custom_id"]}", "status": "completed", "seed": 1}}'.encode())
            for row in rows:
                job = self.retried("a batch row's registration", run._register,
                                   {"custom_id": row["custom_id"], "status": "completed", "seed": 1})
                if job is None:
                    continue  # deleted by its owner meanwhile (below, by the driver before)
                self.batch_jobs.add(job.id)
                videos[row["custom_id"]] = job.id
            self.log(f"a batch registers {len(rows)} row(s) as videos (driver d{driver})")
            for custom_id, video_id in sorted(videos.items()):
                how = rng.choice(("keep", "keep", "delete", "hide")) if video_id is not None else "keep"
                if how != "keep":
                    self.log(f"the owner deletes batch video {video_id[-6:]}{' (cut short)' if how == 'hide' else ''}")
                    self.request("delete" if how == "delete" else "hide", video_id)
                    videos[custom_id] = None
        self.retried("the batch's end", run._finish)
        self.log(f"the batch ends: {len(rows)} row(s), {sum(v is None for v in videos.values())} deleted")
        self.check_batch(batch.id, rows, videos)

    def retried(self, what: str, fn: Any, *args: Any) -> Any:
        """`fn(*args)` through the API's faulty connection, retried as its caller would."""
        for _ in range(50):
            try:
                return fn(*args)
            except (OperationalError, StoreUnavailable):
                continue
        raise Violation(f"{what} never went through")

    def check_batch(self, batch_id: str, rows: list[dict], videos: dict[str, str | None]) -> None:
        """An ended batch accounts for each row once: in its output file with its video, or (its video
        deleted) in its error file as ``video_deleted``; a deleted video was not made again."""
        store = BatchStore(self.db)
        batch = store.get(batch_id)
        lines = {}
        for name, file_id in (("output", batch.output_file_id), ("error", batch.error_file_id)):
            if file_id is not None:
                for line in self.store.get(store.get_file(file_id).key).decode().splitlines():
                    lines.setdefault(json.loads(line)["custom_id"], []).append((name, json.loads(line)))
        if batch.status != "completed" or (batch.completed, batch.failed) != (len(rows), 0):
            raise Violation(f"batch {batch_id}: {batch.status}, counts {batch.completed}/{batch.failed}")
        for row in rows:
            custom_id, video_id = row["custom_id"], videos.get(row["custom_id"])
            got = lines.get(custom_id, [])
            if len(got) != 1:
                raise Violation(f"batch {batch_id}: row {custom_id} in its files {len(got)} times")
            name, line = got[0]
            if video_id is None:
                if (name, line["error"] and line["error"]["code"]) != ("error", "video_deleted"):
                    raise Violation(f"batch {batch_id}: deleted row {custom_id} ended as {line}")
            elif (name, line["response"] and line["response"]["body"]["id"]) != ("output", video_id):
                raise Violation(f"batch {batch_id}: row {custom_id} ended as {line}, its video is {video_id}")
        with self.db.read() as conn:
            made = {row.custom_id: row.video_id for row in conn.execute(
                select(batch_videos).where(batch_videos.c.batch_id == batch_id))}
            live = set(conn.execute(select(jobs.c.id).where(jobs.c.id.in_(list(made.values())),
                                                            jobs.c.delete_requested.is_(False))).scalars())
        if set(made) != {row["custom_id"] for row in rows}:
            raise Violation(f"batch {batch_id}: videos recorded for {sorted(made)}")
        if live != {v for v in videos.values() if v is not None}:
            raise Violation(f"batch {batch_id}: live videos {sorted(live)}, expected {videos}")

    def request(self, action: str, job_id: str) -> None:
        """The API's cancel or delete (a delete of an ended job removes its files and row at once; ``hide``:
        the API replica died once the job was hidden)."""
        for _ in range(50):
            try:
                if action == "cancel":
                    self.api.jobs.request_cancel(job_id)
                    return
                try:
                    ended = self.api.jobs.request_delete(job_id)
                except KeyError:
                    return  # gone already
                self.deleted.add(job_id)
                if ended and action == "delete":
                    self.files.delete_all(job_id)
                    self.api.jobs.delete(job_id)
                return
            except OperationalError:
                continue
        raise Violation(f"the {action} of {job_id} never went through")

    def expire(self, job_ids: list[str]) -> None:
        with self.db.write() as conn:
            conn.execute(update(jobs).where(jobs.c.id.in_(job_ids), jobs.c.lease_expires_at.is_not(None))
                         .values(lease_expires_at=0.0))

    def renew(self, runner: Actor) -> None:
        """The runner replica's renewal round (`Runner._renew_round`): it renews the leases of the runs
        still going and cancels those whose lease another runner took."""
        from test_exactly_once import _runner

        class Jobs:  # the runner's JobStore, outside any fault (its renewals are not what is tested here)
            renew = staticmethod(self.base.renew)
            queued_count = staticmethod(lambda: 0)

        bare = _runner(types.SimpleNamespace(jobs=Jobs, settings=self.settings), runner.name,
                       {job_id: (run, _ThreadsafeTask(task, loop)) for job_id, (run, task, loop) in runner.runs.items()})
        in_thread(asyncio.run, bare._renew_round())

    def sweep(self) -> None:
        """Retention passes for this history's ended jobs, batches and files; the runners' sweep
        (`retention.sweep_expired`) deletes them."""
        with self.db.write() as conn:
            for table, column in ((jobs, jobs.c.expires_at), (batches_table, batches_table.c.retention_ends_at),
                                  (files_table, files_table.c.expires_at)):
                conn.execute(update(table).where(table.c.owner == self.tag, column.is_not(None)).values({column: 0.0}))
        swept = sweep_expired(self.base, BatchStore(self.db), self.files, limit=1000)
        self.swept.update(job_id for job_id in swept.jobs if job_id in self.kind or job_id in self.batch_jobs)

    def start_run(self, runner: Actor) -> Handle:
        """`runner` claims and runs a job in a thread of its own, until the run stalls or ends."""
        handle = Handle(runner, len(self.handles))
        self.handles.append(handle)

        def go() -> None:
            handle.claimed = self.claim_and_run(runner)

        handle.start(go)
        self.raise_errors()
        return handle

    def raise_errors(self) -> None:
        if self.violation is not None:
            raise self.violation
        for handle in self.handles:
            if handle.error is not None:
                raise handle.error

    def claim_and_run(self, runner: Actor) -> bool:
        """`runner` claims a job (as `Runner._dispatch`, with the jobs it runs) and runs it to its end,
        its death or its drain; False if there was nothing to claim."""
        try:
            lease = runner.jobs.claim(runner.name, running=set(runner.runs))
        except Killed:
            self.log(f"{runner.name} died claiming")
            return True
        except OperationalError:
            return True  # the dispatch loop tries again at its next poll
        if lease is None:
            self.log(f"{runner.name} finds nothing to claim")
            return False
        self.log(f"{runner.name} claims {lease.job_id[-6:]} (epoch {lease.epoch}, step {lease.job.checkpoint_step})")
        run = JobRun(runner.ctx, lease)

        async def main() -> None:
            task = asyncio.ensure_future(run.run())
            runner.runs[lease.job_id] = (run, task, asyncio.get_running_loop())
            await task

        try:
            asyncio.run(main())
            self.log(f"{runner.name} run of {lease.job_id[-6:]} returned (let go: {run.let_go})")
        except Killed:
            runner.dead = True
            self.log(f"{runner.name} died running {lease.job_id[-6:]}")
        except asyncio.CancelledError:
            runner.stopped = True
            self.log(f"{runner.name} run of {lease.job_id[-6:]} cancelled (drained)")
        finally:
            runner.runs.pop(lease.job_id, None)
        if runner.ctx.draining.is_set():
            runner.stopped = True
        return True

    # -- the invariants --------------------------------------------------------------------------------

    def rows(self) -> dict[str, Any]:
        with self.db.read() as conn:
            return {row.id: row for row in conn.execute(select(jobs).where(jobs.c.owner == self.tag))}

    def active_jobs(self) -> list[str]:
        return sorted(job_id for job_id, row in self.rows().items() if row.status in ACTIVE)

    def check_point(self) -> None:
        """What holds at every point: no terminal state is overwritten; no checkpoint (latents, or the
        decoded windows before it) is missing while a job may still resume from it."""
        for job_id, row in self.rows().items():
            if row.status in TERMINAL:
                first = self.ended.setdefault(job_id, row.status)
                if first != row.status:
                    raise Violation(f"{job_id}: terminal state {first} overwritten by {row.status}")
            elif job_id in self.ended:
                raise Violation(f"{job_id}: ended {self.ended[job_id]}, now {row.status} again")
            elif row.checkpoint_key is not None:
                if not self.store.exists(row.checkpoint_key):
                    raise Violation(f"{job_id}: checkpoint {row.checkpoint_key} of a live job deleted")
                steps = REQUESTS[self.kind[job_id]]["steps"]
                for i in range(-(-row.checkpoint_step // steps) - 1):
                    if self.kind[job_id] == "long" and not self.store.exists(self.files.window_frames_key(job_id, i)):
                        raise Violation(f"{job_id}: window {i}'s frames deleted before step {row.checkpoint_step}")

    def events(self, job_id: str) -> list[dict]:
        return self.base.events_after(job_id, -1)

    def list_jobs(self, limit: int, order: str, complete: bool) -> list[str]:
        seen: list[str] = []
        while page := [job.id for job in self.base.list(limit=limit, after=seen[-1] if seen else None, order=order,
                                                        owner=self.tag)]:
            seen += page
            if len(seen) > 1000:
                raise Violation("listing does not end")
        if len(set(seen)) != len(seen):
            raise Violation(f"listing repeats a job: {seen}")
        if complete:
            rows = self.rows()
            expected = sorted((job_id for job_id, row in rows.items() if not row.delete_requested),
                              key=lambda job_id: (rows[job_id].created_at, job_id), reverse=order == "desc")
            if seen != expected:
                raise Violation(f"listing ({order}, pages of {limit}) gave {seen}, expected {expected}")
        return seen

    def check_end(self) -> None:
        """After every actor stopped and every job ended, then after the sweep."""
        rows = self.rows()
        with self.db.read() as conn:
            hooks: dict[str, list[str]] = {}
            for row in conn.execute(select(webhook_deliveries.c.job_id, webhook_deliveries.c.event_type)
                                    .where(webhook_deliveries.c.job_id.in_(list(self.kind) + list(self.batch_jobs)))):
                hooks.setdefault(row.job_id, []).append(row.event_type)
        for job_id, kind in self.kind.items():
            row = rows.get(job_id)
            if row is None:
                if job_id not in self.deleted and job_id not in self.swept:
                    raise Violation(f"{job_id}: accepted, never deleted nor expired, and gone")
                if len(hooks.get(job_id, [])) != 1:
                    raise Violation(f"{job_id}: deleted with webhooks {hooks.get(job_id)}")
                continue
            if row.status not in TERMINAL:
                raise Violation(f"{job_id}: stranded {row.status} (holder {row.lease_holder})")
            events = self.events(job_id)
            types_ = [e["type"] for e in events]
            if [e["seq"] for e in events] != list(range(len(events))):
                raise Violation(f"{job_id}: event seqs {[e['seq'] for e in events]}")
            ends = [i for i, t in enumerate(types_) if t in TERMINAL]
            if ends != [len(events) - 1] or types_[-1] != row.status:
                raise Violation(f"{job_id}: {row.status} with events {types_}")
            if hooks.get(job_id) != [f"video.{row.status}"]:
                raise Violation(f"{job_id}: {row.status} with webhooks {hooks.get(job_id)}")
            if row.version != len(events):
                raise Violation(f"{job_id}: version {row.version} with {len(events)} events")
            request = REQUESTS[kind]
            total = request["steps"] * (3 if kind == "long" else 1)
            steps = [e["step"] for e in events if e["type"] == "step"]
            if steps != list(range(1, len(steps) + 1)):
                raise Violation(f"{job_id}: steps recorded {steps}")
            segments = [e["segment"] for e in events if e["type"] == "segment"]
            if segments != list(range(len(segments))):
                raise Violation(f"{job_id}: segments recorded {segments}")
            if row.status == "completed" and row.delete_requested:
                pass  # deleted after it completed: its files may be gone already, its row goes with the sweep
            elif row.status == "completed":
                if len(steps) != total or (kind == "long" and len(segments) != 3):
                    raise Violation(f"{job_id}: completed after steps {steps}, segments {segments}")
                video = self.store.get(self.files.result_key(job_id, "video"))
                if video != self.references[kind]:
                    raise Violation(f"{job_id}: its video differs from an uninterrupted run's")
            elif row.status == "cancelled":
                if not row.cancel_requested:
                    raise Violation(f"{job_id}: cancelled, never asked to be")
            elif (row.error or {}).get("code") != "runner_lost":
                raise Violation(f"{job_id}: failed: {row.error}")
        for job_id in self.batch_jobs:
            row = rows.get(job_id)
            if row is None:
                if job_id not in self.swept and job_id not in self.deleted:
                    raise Violation(f"batch video {job_id}: gone, never deleted nor expired")
                continue
            types_ = [e["type"] for e in self.events(job_id)]
            if row.status != "completed" or types_ != ["completed"] or hooks.get(job_id):
                raise Violation(f"batch video {job_id}: {row.status}, events {types_}, webhooks {hooks.get(job_id)}")
            if not row.delete_requested and self.store.get(self.files.result_key(job_id, "video")) != b"batch video":
                raise Violation(f"batch video {job_id}: its video is not the batch's")
        unknown = set(rows) - set(self.kind) - self.batch_jobs
        if unknown:
            raise Violation(f"rows nobody made: {sorted(unknown)}")
        order = self.rng.choice(("asc", "desc"))
        self.list_jobs(self.rng.randint(1, 3), order, complete=True)
        self.sweep()
        left = self.rows()
        if left:
            raise Violation(f"rows left after the sweep: {sorted(left)}")
        with self.db.read() as conn:
            left = [*conn.execute(select(batches_table.c.id).where(batches_table.c.owner == self.tag)).scalars(),
                    *conn.execute(select(files_table.c.id).where(files_table.c.owner == self.tag)).scalars(),
                    *conn.execute(select(batch_videos.c.video_id)
                                  .where(batch_videos.c.batch_id.in_(list(self.batches)))).scalars()]
        left += [key for batch_id in self.batches for key in self.store.list(batch_folder(batch_id))]
        if left:
            raise Violation(f"batches, files or their stored keys left after the sweep: {left}")
        with self.db.read() as conn:
            events = conn.execute(select(job_events.c.job_id)
                                  .where(job_events.c.job_id.in_([*self.kind, *self.batch_jobs]))).all()
        if events:
            raise Violation(f"events left after the sweep: {sorted({e.job_id for e in events})}")
        for job_id in [*self.kind, *self.batch_jobs]:
            for folder in ("inputs", "results", "checkpoints"):
                files = self.store.list(f"{folder}/{job_id}/")
                # Known limits: a runner that dies after writing a file of a job removed meanwhile, or whose
                # removal of its files gave up on an outage, leaves that file (no sweep lists the store).
                excused = [key for key in files if job_id in self.failed_cleanups or
                           (key in self.writers and self.writers[key].dead)]
                if excused:
                    self.stats["known:orphan-file"] += 1
                    self.log(f"{job_id[-6:]}: files a dead runner or a failed cleanup left: {excused}")
                    for key in excused:
                        self.store.delete(key)
                if left := sorted(set(files) - set(excused)):
                    raise Violation(f"{job_id}: files left after the sweep: {left}")

    def abandon(self) -> None:
        """After a counterexample: end this history's jobs where they are, so that the next histories on
        the database never claim them (its stalled runs stay parked for good)."""
        self.faults_left = self.actions_left = 0
        with self.db.write() as conn:
            conn.execute(update(jobs).where(jobs.c.owner == self.tag, jobs.c.status.in_(ACTIVE))
                         .values(status="failed", lease_holder=None, lease_expires_at=None))

    # -- the history -----------------------------------------------------------------------------------

    def run(self) -> None:
        rng = self.rng
        self.log(f"seed {self.seed}: faults p={self.fault_p} (≤{self.faults_left}), actions p={self.action_p} "
                 f"(≤{self.actions_left}), max_takeovers={self.settings.max_takeovers}")
        for _ in range(rng.randint(1, 3)):
            self.submit()
        if rng.random() < 0.2:
            self.register_batch_rows()
        idle_rounds = 0
        for _ in range(300):
            stalled = [h for h in self.handles if h.stalled]
            if not stalled and not self.active_jobs():
                break
            if stalled and (idle_rounds or rng.random() < 0.5):
                handle = rng.choice(stalled)
                self.log(f"{handle.actor.name}#{handle.n} resumes")
                handle.resume()
                self.raise_errors()
                continue
            live = [a for a in self.actors if a.live]
            if len(live) < 2:
                live.append(self.new_actor())
            runner = rng.choice(live)
            if self.start_run(runner).claimed is not False:
                idle_rounds = 0
                continue
            idle_rounds += 1
            if idle_rounds > 3:  # faults over: nobody runs at the top level, so every lease may lapse
                self.faults_left = self.actions_left = 0
            self.log("time passes: every lease lapses")
            self.outage.clear()
            self.expire(self.active_jobs())
        else:
            raise Violation(f"jobs never ended: {self.active_jobs()}")
        self.faults_left = self.actions_left = 0
        self.check_point()
        self.check_end()


def references(db: Database, store: LocalStore) -> dict[str, bytes]:
    """The video of an uninterrupted run of each request."""
    checker = Checker(-1, db, store, {})
    out = {}
    for kind in REQUESTS:
        checker.faults_left = checker.actions_left = 0
        plan = plan_request(parse_request(REQUESTS[kind]), get_preset("tiny"))
        job_id = f"{JOB_PREFIX}{int(time.time() * 1000):012x}{random.getrandbits(48):012x}"
        checker.base.create(Job(id=job_id, owner="reference", created_at=0, request=plan.request.model_dump(),
                                plan=job_plan(plan)), {"type": "queued"})
        with virtual_clock():
            checker.claim_and_run(checker.actors[0])
        assert checker.base.get(job_id).status == "completed"
        out[kind] = store.get(checker.files.result_key(job_id, "video"))
    return out


def run_histories(database_url: str, store_root: Path, seeds: Any, verbose: bool = False,
                  deadline: float | None = None, database: str = "", stats: Counter | None = None) -> int:
    """Run the histories of `seeds` on one database and store; raises `Counterexample` on the first that
    breaks an invariant. Returns how many ran (fewer when `deadline`, a `time.time()`, passed)."""
    db = open_database(database_url)
    store = LocalStore(store_root)
    ran = 0
    try:
        refs = references(db, store)
        with virtual_clock():
            for seed in seeds:
                if deadline is not None and time.time() > deadline:
                    break
                checker = Checker(seed, db, store, refs, verbose)
                try:
                    checker.run()
                except BaseException as exc:
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    checker.abandon()
                    raise Counterexample(seed, database or db.dialect, exc, checker.history) from exc
                finally:
                    if stats is not None:
                        stats.update(checker.stats)
                ran += 1
    finally:
        db.dispose()
    return ran


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.getLogger("ray.serve").setLevel(logging.CRITICAL)  # the runs' own logs (`-v` prints the history)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # a killed runner's write nobody awaits any more
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--histories", type=int, default=1000, help="seeds to run on each database")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, help="replay this one history (with -v: print it)")
    parser.add_argument("--database", action="append", choices=("sqlite", "postgres"),
                        help="repeatable; default both (the same seeds on each, in alternating chunks)")
    parser.add_argument("--time-limit", type=float, help="seconds; stop starting histories after this")
    parser.add_argument("--keep-going", action="store_true", help="report every counterexample, not the first")
    parser.add_argument("--chunk", type=int, default=50, help="histories per database between progress lines")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    databases = args.database or ["sqlite", "postgres"]
    seeds = [args.seed] if args.seed is not None else list(range(args.first_seed, args.first_seed + args.histories))
    started = time.time()
    deadline = None if args.time_limit is None else started + args.time_limit
    found: list[str] = []
    ran = dict.fromkeys(databases, 0)
    stats: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="exactly-once-") as tmp:
        server = None
        try:
            urls = {}
            for database in databases:
                if database == "sqlite":
                    urls[database] = f"sqlite:///{tmp}/jobs.db"
                else:
                    from pgserver import start_postgres_server

                    server = start_postgres_server()
                    urls[database] = server.create_database()
            position = dict.fromkeys(databases, 0)
            stopped: set[str] = set()
            while len(stopped) < len(databases) and (deadline is None or time.time() < deadline):
                for database in databases:
                    if database in stopped:
                        continue
                    chunk = seeds[position[database]:position[database] + args.chunk]
                    if not chunk:
                        stopped.add(database)
                        continue
                    try:
                        done = run_histories(urls[database], Path(tmp) / f"store-{database}", chunk, args.verbose,
                                             deadline, database, stats)
                    except Counterexample as counterexample:
                        print(counterexample, flush=True)
                        found.append(f"seed {counterexample.seed} on {database}: {counterexample.error}")
                        done = chunk.index(counterexample.seed) + 1
                        if not args.keep_going:
                            stopped.update(databases)
                    ran[database] += done
                    position[database] += done
                    if done < len(chunk) and database not in stopped and deadline is not None \
                            and time.time() >= deadline:
                        stopped.add(database)
                print(f"{time.time() - started:.0f} s: " + ", ".join(f"{db} {n} histories" for db, n in ran.items())
                      + f", {len(found)} counterexample(s)", flush=True)
        finally:
            if server is not None:
                server.close()
    print("ran: " + ", ".join(f"{db} {n} histories (seeds {seeds[0]}..{seeds[0] + n - 1})" for db, n in ran.items()))
    print("injected: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
    for line in found:
        print("COUNTEREXAMPLE", line.splitlines()[0])
    print(f"done: {sum(ran.values())} histories, {len(found)} counterexample(s) in {time.time() - started:.0f} s",
          flush=True)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
