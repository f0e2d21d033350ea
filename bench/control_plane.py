"""The control plane's cost on the CPU, the old job store against the new one, in one run.

*Old*: the job records this project kept before the job database, one JSON object per job in the blob
store with its events inside (``deployments/jobs.py`` at commit 6b4fd00, loaded from git), on a local
folder and on S3. *New*: the job database (a SQLite file, or PostgreSQL) with the step checkpoint in the
blob store. S3 is a SeaweedFS server on loopback and PostgreSQL a throwaway server (``tests/``), both
started by this script.

1. **Per step**: what the job's owner does after each DiT step, over a 50-step job with the tiny
   preset's latents (64x64x17: 20 KB). Old: the cancel check (``exists``) and the record rewritten with
   the new event (``save``: the active marker and the record, which holds every event so far). New:
   the checkpoint written to the blob store, one fenced transaction (the event, progress and checkpoint
   pointer; the flags come back), the previous checkpoint deleted. Store requests and SQL statements
   (each one round trip; a transaction adds its COMMIT, and on PostgreSQL its BEGIN) and the bytes
   sent, at step 10 and step 50; the time a step waits for all of it (median and p95 over the 50 steps
   of 3 jobs). Also one checkpoint of the real model's 480p latents (8.4 MB).
2. **Listing**: a page of 20 with 10,000 jobs in the store, first page and one from a cursor in the
   middle (median of 20 calls). Old: the list of every record key, then the page's records; new: one
   index range scan.
3. **The service**: ``bench/service.py`` (per-step overhead over the in-process pipeline at 64x64x17;
   16 concurrent jobs) on the old commit's checkout (its file store) and on this one, with SQLite and
   with PostgreSQL. Skipped with ``--skip service``.
4. **Drain**: two runner replicas with four jobs mid-way (~0.3 s steps); a redeploy replaces both
   runners. Per released job: the time from its last step's event to its release (the drain's own
   cost); and from the redeploy until every job was released.

Usage::

    .venv/bin/python bench/control_plane.py --out control_plane.json

Prints markdown and writes every number as JSON. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
from pgserver import running_postgres_server  # noqa: E402
from s3server import REGION, running_s3_server  # noqa: E402
from sqlalchemy import event, insert  # noqa: E402

from pusa_jobs.db import Database, open_database  # noqa: E402
from pusa_jobs.job_files import JobFiles  # noqa: E402
from pusa_jobs.job_store import JobStore  # noqa: E402
from pusa_jobs.jobs import Job, job_created_at, new_job_id  # noqa: E402
from pusa_jobs.schema import job_events, jobs  # noqa: E402
from pusa_jobs.storage import S3Store, Store, open_store  # noqa: E402

OLD_REF = "6b4fd00"  # the last commit with the file/S3 job records
STEPS, JOBS_PER_CASE = 50, 3
TINY_LATENTS = (1, 16, 5, 8, 8)  # 64x64x17
REAL_LATENTS = (1, 16, 21, 60, 104)  # 832x480x81
LIST_JOBS, PAGE = 10_000, 20
REQUEST = {"task": "t2v", "prompt": "A cat walks on the grass, realistic", "negative_prompt": "blurry",
           "steps": STEPS, "guidance": 5.0, "lora_alpha": 1.4, "seed": 1, "width": 64, "height": 64,
           "frames": 17, "fps": 25}
PLAN = {"width": 64, "height": 64, "frames": 17, "fps": 25, "seed": 1, "steps": STEPS, "task": "t2v",
        "latent_frames": 5}


def old_jobs_module() -> types.ModuleType:
    """``deployments/jobs.py`` as it was at `OLD_REF` (its `JobStore` works on today's `Store`)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_REF}:deployments/jobs.py"],
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("old_jobs")
    sys.modules[module.__name__] = module  # pydantic resolves the module's annotations through it
    exec(compile(source, f"{OLD_REF}:deployments/jobs.py", "exec"), module.__dict__)  # noqa: S102
    return module


class CountingStore(Store):
    """A `Store` that counts the requests made to `inner` and the bytes written."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.requests, self.bytes = inner, 0, 0

    @property
    def uri(self) -> str:
        return self.inner.uri

    def put(self, key, data, content_type=None):
        self.requests += 1
        self.bytes += len(data) + len(key)
        return self.inner.put(key, data, content_type)

    def get(self, key):
        self.requests += 1
        return self.inner.get(key)

    def exists(self, key):
        self.requests += 1
        self.bytes += len(key)
        return self.inner.exists(key)

    def delete(self, key):
        self.requests += 1
        self.bytes += len(key)
        return self.inner.delete(key)

    def list(self, prefix=""):
        self.requests += 1
        return self.inner.list(prefix)

    def url(self, key, expires_s=3600):
        return self.inner.url(key, expires_s)


class SqlCounter:
    """Round trips and bytes sent to a database: statements (with their parameters) and commits."""

    def __init__(self, db: Database) -> None:
        self.round_trips = self.bytes = 0
        self.dialect = db.dialect
        event.listen(db.engine, "before_cursor_execute", self._statement)
        event.listen(db.engine, "commit", self._commit)

    def _statement(self, conn, cursor, statement, parameters, context, executemany) -> None:
        self.round_trips += 1
        self.bytes += len(statement) + len(json.dumps(parameters, default=str))

    def _commit(self, conn) -> None:
        self.round_trips += 2 if self.dialect == "postgresql" else 1  # PostgreSQL: BEGIN was its own


def stats_ms(times: list[float]) -> dict:
    return {"median_ms": round(statistics.median(times) * 1000, 2),
            "p95_ms": round(float(np.percentile(times, 95)) * 1000, 2), "n": len(times)}


def new_job(created_at: float | None = None) -> Job:
    job_id = new_job_id(created_at)
    return Job(id=job_id, created_at=job_created_at(job_id), request=REQUEST, plan=PLAN)


def step_event(k: int) -> dict:
    return {"type": "step", "step": k, "total": STEPS, "timesteps": [round(900.0 - k, 3)] * 5,
            "elapsed_s": 0.1 * k, "eta_s": 0.1 * (STEPS - k)}


# -- 1. per step -----------------------------------------------------------------------------------


def old_per_step(old, store: CountingStore) -> dict:
    """The old runner's work after each step: cancel check, then the record saved with the event."""
    jobs_ = old.JobStore(store)
    times, at = [], {}
    for _ in range(JOBS_PER_CASE):
        job = old.Job(id=old.new_job_id(), created_at=time.time(), request=REQUEST, plan=PLAN, status="in_progress")
        jobs_.create(job)
        for k in range(1, STEPS + 1):
            before = (store.requests, store.bytes)
            t0 = time.perf_counter()
            jobs_.cancel_requested(job.id)
            jobs_.add_event(job, step_event(k))
            jobs_.save(job)
            times.append(time.perf_counter() - t0)
            if k in (10, 50):
                at[k] = {"round_trips": store.requests - before[0], "bytes": store.bytes - before[1]}
    return {"step": stats_ms(times), "at": at}


def new_per_step(store_: JobStore, files: JobFiles, counted: CountingStore, sql: SqlCounter) -> dict:
    """The runner's work after each step: checkpoint, one fenced write, the old checkpoint deleted."""
    latents = np.random.default_rng(0).standard_normal(TINY_LATENTS, dtype=np.float32)
    times, at = [], {}
    for _ in range(JOBS_PER_CASE):
        job = store_.create(new_job(), {"type": "queued"})
        lease = store_.claim("bench")
        assert lease.job_id == job.id
        previous = None
        for k in range(1, STEPS + 1):
            before = (counted.requests, counted.bytes, sql.round_trips, sql.bytes)
            t0 = time.perf_counter()
            key = files.put_checkpoint(job.id, lease.epoch, k, latents)
            store_.record(lease, step_event(k), progress=2 + 93 * k // STEPS, checkpoint_step=k, checkpoint_key=key)
            if previous:
                files.store.delete(previous)
            previous = key
            times.append(time.perf_counter() - t0)
            if k in (10, 50):
                at[k] = {"store_requests": counted.requests - before[0], "store_bytes": counted.bytes - before[1],
                         "sql_round_trips": sql.round_trips - before[2], "sql_bytes": sql.bytes - before[3]}
        store_.finish(lease, "completed", {"type": "completed"}, retention_s=3600)
    return {"step": stats_ms(times), "at": at}


def db_only_per_step(store_: JobStore) -> dict:
    """The fenced write alone (no blob store)."""
    times = []
    for _ in range(JOBS_PER_CASE):
        store_.create(new_job(), {"type": "queued"})
        lease = store_.claim("bench-db")
        for k in range(1, STEPS + 1):
            t0 = time.perf_counter()
            store_.record(lease, step_event(k), progress=k, checkpoint_step=k, checkpoint_key=f"k{k}")
            times.append(time.perf_counter() - t0)
    return stats_ms(times)


def checkpoint_480p(files: JobFiles, runs: int = 5) -> dict:
    latents = np.random.default_rng(1).standard_normal(REAL_LATENTS, dtype=np.float32)
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        key = files.put_checkpoint("video_bench480p", 1, i, latents)
        times.append(time.perf_counter() - t0)
        files.store.delete(key)
    return {**stats_ms(times), "mb": round(latents.nbytes / 1e6, 2)}


# -- 2. listing ------------------------------------------------------------------------------------


def fill_old(old, store: Store, count: int) -> list[str]:
    """`count` finished job records in the old layout (a record per job, 8 events each)."""
    t0 = time.time() - count
    made = []

    def one(i: int) -> str:
        job = old.Job(id=old.new_job_id(t0 + i), created_at=t0 + i, request=REQUEST, plan=PLAN, status="completed")
        for k in range(8):
            job.events.append({**step_event(k), "seq": k})
        store.put(f"jobs/{job.id}.json", job.model_dump_json().encode(), "application/json")
        return job.id

    with ThreadPoolExecutor(16) as pool:
        made = list(pool.map(one, range(count)))
    return sorted(made)


def fill_new(db: Database, count: int) -> list[str]:
    t0 = time.time() - count
    rows, events = [], []
    for i in range(count):
        job = new_job(t0 + i).model_copy(update={"status": "completed", "version": 8})
        rows.append(job.model_dump())
        events += [{"job_id": job.id, "seq": k, "type": "step", "data": step_event(k), "created_at": t0 + i}
                   for k in range(8)]
    with db.write() as conn:
        conn.execute(insert(jobs), rows)
        conn.execute(insert(job_events), events)
    return sorted(r["id"] for r in rows)


def list_times(list_page, ids: list[str], calls: int = 20) -> dict:
    middle = ids[len(ids) // 2]
    out = {}
    for name, after in (("first page", None), ("from a cursor", middle)):
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            page = list_page(after)
            times.append(time.perf_counter() - t0)
        assert len(page) == PAGE, len(page)
        out[name] = stats_ms(times)
    return out


# -- 3. the service --------------------------------------------------------------------------------


def service_bench(cwd: Path, out: Path, database: str | None, load_repeats: int) -> dict:
    """`bench/service.py` of the checkout at `cwd`: per-step overhead at 64x64x17 and 16 concurrent jobs."""
    cmd = [sys.executable, "bench/service.py", "--runs", "3", "--large-steps", "2", "--skip", "hop",
           "--load-levels", "16", "--load-repeats", str(load_repeats), "--out", str(out)]
    if database:
        cmd += ["--database", database]
    env = {**os.environ, "PYTHONPATH": f"{cwd}{os.pathsep}{cwd / 'tests'}"}
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    small = result["overhead"][0]
    load = result["load"][0]
    return {"inprocess_ms": small["inprocess"]["median_ms"], "service_ms": small["service"]["median_ms"],
            "overhead_ms": small["overhead_ms"], "overhead_run_pairs_ms": small["overhead_run_pairs_ms"],
            "jobs_per_min": load["jobs_per_min"], "p50_s": load["p50_s"], "p95_s": load["p95_s"]}


# -- 4. drain --------------------------------------------------------------------------------------


def drain(tmp: Path) -> dict:
    from ray.serve.schema import ServeDeploySchema  # noqa: PLC0415 - only this part needs Ray
    from serving import default_database, local_config, running_service  # noqa: PLC0415

    from deployments.launch import deploy  # noqa: PLC0415

    store = str(tmp / "drain-store")
    database = default_database(store)
    runner = {"poll_s": 0.2, "drain_wait_s": 20}
    deployments = {"Runner": {"num_replicas": 2}, "DiT": {"num_replicas": 2, "autoscaling_config": None}}
    import httpx  # noqa: PLC0415

    with running_service(store, runner=runner, deployments=deployments, database=database) as url:
        store_ = JobStore(Database(database))
        ids = [httpx.post(f"{url}/v1/videos", json={"prompt": "drain", "size": "1024x1024", "frames": 1,
                                                    "steps": 30, "seed": i}, timeout=30).json()["id"]
               for i in range(4)]
        while min(sum(e["type"] == "step" for e in store_.events_after(i, -1)) for i in ids) < 3:
            time.sleep(0.05)
        config = local_config(store, int(url.rsplit(":", 1)[1]), runner={**runner, "poll_s": 0.25},
                              deployments=deployments, database=database)
        started = time.time()
        assert not deploy(ServeDeploySchema.model_validate(config), 180)
        gaps, released_at, step_s = [], [], []
        for job_id in ids:
            while not store_.get(job_id).terminal:
                time.sleep(0.2)
            with store_.db.read() as conn:
                rows = conn.execute(job_events.select().where(job_events.c.job_id == job_id)
                                    .order_by(job_events.c.seq)).all()
            steps = [r.created_at for r in rows if r.type == "step"]
            step_s += [b - a for a, b in zip(steps, steps[1:])]
            for before, row in zip(rows, rows[1:]):
                if row.type == "released":
                    gaps.append(row.created_at - before.created_at)
                    released_at.append(row.created_at)
    return {"jobs": len(ids), "released": len(gaps), "release_after_step": stats_ms(gaps) if gaps else None,
            "step": stats_ms(step_s), "redeploy_to_last_release_s": round(max(released_at) - started, 2)
            if released_at else None}


# -- report ----------------------------------------------------------------------------------------


def markdown(r: dict) -> str:
    lines = [f"{r['environment']['machine']}; PostgreSQL {r['environment']['postgres']}, SQLite "
             f"{r['environment']['sqlite']}; {r['wall_s']:.0f} s.", "",
             f"Per step ({STEPS}-step job, 64x64x17 latents; median / p95 ms; round trips and bytes at step 10 → 50):", "",
             "| store | a step waits | round trips | bytes sent |", "|---|---|---|---|"]
    for name, row in r["per_step"].items():
        at = row["at"]
        if "round_trips" in at["10"]:
            trips = f"{at['10']['round_trips']} → {at['50']['round_trips']}"
            sent = f"{at['10']['bytes']:,} → {at['50']['bytes']:,}"
        else:
            trips = (f"{at['10']['store_requests']} store + {at['10']['sql_round_trips']} SQL → "
                     f"{at['50']['store_requests']} + {at['50']['sql_round_trips']}")
            sent = (f"{at['10']['store_bytes']:,} store + {at['10']['sql_bytes']:,} SQL → "
                    f"{at['50']['store_bytes']:,} + {at['50']['sql_bytes']:,}")
        lines.append(f"| {name} | {row['step']['median_ms']:.2f} / {row['step']['p95_ms']:.2f} | {trips} | {sent} |")
    lines += ["", "The database write alone: " + ", ".join(
        f"{k} {v['median_ms']:.2f} / {v['p95_ms']:.2f} ms" for k, v in r["db_only"].items()),
        "A 480p checkpoint (8.4 MB): " + ", ".join(f"{k} {v['median_ms']:.1f} ms" for k, v in r["checkpoint_480p"].items()),
        "", f"Listing a page of {PAGE} with {LIST_JOBS:,} jobs (median / p95 ms):", "",
        "| store | first page | from a cursor |", "|---|---|---|"]
    for name, row in r["listing"].items():
        lines.append(f"| {name} | {row['first page']['median_ms']:.2f} / {row['first page']['p95_ms']:.2f} "
                     f"| {row['from a cursor']['median_ms']:.2f} / {row['from a cursor']['p95_ms']:.2f} |")
    if r.get("service"):
        lines += ["", "The service (64x64x17, guidance 5; per-step overhead = service − in-process, ms; "
                  "16 concurrent 4-step jobs):", "",
                  "| service | in-process step | service step | overhead (per run) | jobs/min (rounds) | p50 / p95 s |",
                  "|---|---|---|---|---|---|"]
        for name, row in r["service"].items():
            jpm = row["jobs_per_min"]
            lines.append(f"| {name} | {row['inprocess_ms']:.1f} | {row['service_ms']:.1f} | **{row['overhead_ms']:.1f}** "
                         f"({', '.join(f'{v:.1f}' for v in row['overhead_run_pairs_ms'])}) | {jpm['median']:.1f} "
                         f"({', '.join(f'{v:.1f}' for v in jpm['rounds'])}) | {row['p50_s']:.2f} / {row['p95_s']:.2f} |")
    if r.get("drain"):
        d = r["drain"]
        lines += ["", f"Drain: {d['released']} releases of {d['jobs']} jobs; release after the last step "
                  f"{d['release_after_step']['median_ms']:.0f} ms median, {d['release_after_step']['p95_ms']:.0f} p95 "
                  f"(a step: {d['step']['median_ms']:.0f} ms); redeploy to the last release: "
                  f"{d['redeploy_to_last_release_s']} s."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", default="", help="comma list of parts to skip: per_step, listing, service, drain")
    parser.add_argument("--load-repeats", type=int, default=2, help="rounds of 16 concurrent jobs per service")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    started = time.monotonic()
    old = old_jobs_module()
    import sqlite3  # noqa: PLC0415

    result: dict = {"environment": {"machine": f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU",
                                    "python": platform.python_version(), "sqlite": sqlite3.sqlite_version},
                    "per_step": {}, "db_only": {}, "checkpoint_480p": {}, "listing": {}}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pusa-cp-")))
        s3 = stack.enter_context(running_s3_server(tmp / "seaweedfs"))
        pg = stack.enter_context(running_postgres_server())
        with pg.connect() as conn:
            result["environment"]["postgres"] = conn.info.parameter_status("server_version")
        for name, value in {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
                            "AWS_DEFAULT_REGION": REGION, "PUSA_S3_ENDPOINT": s3.endpoint}.items():
            os.environ[name] = value

        def s3_store(prefix: str) -> Store:
            return S3Store("pusa-bench", prefix, endpoint_url=s3.endpoint)

        sqlite_url = f"sqlite:///{tmp / 'jobs.db'}"
        cases = {
            "old: local folder": ("old", lambda: open_store(str(tmp / "old-local"))),
            "old: S3": ("old", lambda: s3_store("old")),
            "new: SQLite + local folder": (sqlite_url, lambda: open_store(str(tmp / "new-local"))),
            "new: PostgreSQL + S3": (pg.create_database(), lambda: s3_store("new")),
        }
        if "per_step" not in skip:
            for name, (database, make_store) in cases.items():
                counted = CountingStore(make_store())
                if database == "old":
                    result["per_step"][name] = old_per_step(old, counted)
                else:
                    db = open_database(database)
                    result["per_step"][name] = new_per_step(JobStore(db), JobFiles(counted), counted, SqlCounter(db))
                    result["db_only"][name.split(": ")[1].split(" +")[0]] = db_only_per_step(JobStore(db))
                    result["checkpoint_480p"][name.split(" + ")[1]] = checkpoint_480p(JobFiles(make_store()))
                print(f"per step, {name}: {result['per_step'][name]['step']}", flush=True)
        if "listing" not in skip:
            old_local, old_s3 = open_store(str(tmp / "list-local")), s3_store("list-old")
            for name, store in (("old: local folder", old_local), ("old: S3", old_s3)):
                ids = fill_old(old, store, LIST_JOBS)
                jobs_ = old.JobStore(store)
                result["listing"][name] = list_times(lambda after, j=jobs_: j.list(PAGE, after, "desc"), ids)
                print(f"listing, {name}: {result['listing'][name]}", flush=True)
            for name, url in (("new: SQLite", f"sqlite:///{tmp / 'list.db'}"), ("new: PostgreSQL", pg.create_database())):
                db = open_database(url)
                ids = fill_new(db, LIST_JOBS)
                store_ = JobStore(db)
                result["listing"][name] = list_times(lambda after, s=store_: s.list(PAGE, after, "desc"), ids)
                print(f"listing, {name}: {result['listing'][name]}", flush=True)
        if "service" not in skip:
            old_tree = tmp / "old-checkout"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_tree), OLD_REF],
                           check=True, capture_output=True)
            try:
                result["service"] = {
                    f"old ({OLD_REF}): file store": service_bench(old_tree, tmp / "old.json", None, args.load_repeats),
                    "new: SQLite": service_bench(ROOT, tmp / "sqlite.json", None, args.load_repeats),
                    "new: PostgreSQL": service_bench(ROOT, tmp / "pg.json", pg.create_database(), args.load_repeats),
                }
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], check=False)
            print(f"service: {result['service']}", flush=True)
        if "drain" not in skip:
            result["drain"] = drain(tmp)
            print(f"drain: {result['drain']}", flush=True)
    result["wall_s"] = round(time.monotonic() - started, 1)
    print()
    print(markdown(json.loads(json.dumps(result))))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
