"""The job database, the same tests on SQLite and on a real PostgreSQL server: migrations, listing,
claims, fenced writes, flags from other replicas, idempotency and retention."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select, text, update

from pusa_jobs.api_keys import KeyStore, Quotas
from pusa_jobs.db import Database, alembic_config, migrate, open_database
from pusa_jobs.db import main as db_main
from pusa_jobs.job_store import IdempotencyConflict, JobStore, LeaseLost
from pusa_jobs.jobs import Job, job_created_at, new_job_id
from pusa_jobs.quotas import Charge, QuotaExceeded
from pusa_jobs.schema import api_keys, job_events, jobs, metadata, usage, webhook_deliveries
from pusa_jobs.webhooks import delivery

T0 = 1_760_000_000.0
HEAD = "0007"  # the latest schema revision


@pytest.fixture
def db(database_url: str):
    db = open_database(database_url)
    yield db
    db.dispose()


@pytest.fixture
def store(db: Database) -> JobStore:
    return JobStore(db, lease_ttl_s=30)


def make_job(created_at: float | None = None, owner: str = "", **fields: Any) -> Job:
    job_id = new_job_id(created_at)
    return Job(id=job_id, owner=owner, created_at=job_created_at(job_id),
               request={"task": "t2v", "prompt": "a cat on the grass", "steps": 10},
               plan={"width": 832, "height": 480, "frames": 81, "fps": 16, "seed": 7, "steps": 10}, **fields)


def add(store: JobStore, created_at: float | None = None, **fields: Any) -> Job:
    return store.create(make_job(created_at, **fields), {"type": "queued", "position": 1})


def expire_leases(db: Database) -> None:
    """Make every lease look expired (as if its holder had stopped renewing long ago)."""
    with db.write() as conn:
        conn.execute(update(jobs).where(jobs.c.lease_expires_at.is_not(None)).values(lease_expires_at=0.0))


# -- schema ----------------------------------------------------------------------------------------


def test_migrations_build_the_declared_schema_once(db: Database) -> None:
    with db.read() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == HEAD
    migrate(db)  # again: nothing to do
    with db.read() as conn:
        assert conn.execute(select(func.count()).select_from(jobs)).scalar_one() == 0


def test_upgrade_keeps_the_jobs_of_an_older_schema(database_url: str) -> None:
    db = Database(database_url)
    with db.write() as conn:
        config = alembic_config(db)
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
    old = make_job()
    with db.write() as conn:  # a row as revision 0001 wrote it
        conn.execute(text("INSERT INTO jobs (id, owner, created_at, status, model, request, plan, inputs) "
                          "VALUES (:id, '', :created_at, 'queued', 'pusa-v1', '{}', :plan, '{}')"),
                     {"id": old.id, "created_at": old.created_at, "plan": json.dumps(old.plan)})
    migrate(db)
    store = JobStore(db)
    assert store.get(old.id).adopted is False and store.claim("r1").job_id == old.id
    db.dispose()


def test_replicas_starting_together_migrate_once(database_url: str) -> None:
    """Eight processes' worth of engines racing to create the schema: all succeed, one schema."""
    errors = []

    def start() -> None:
        try:
            open_database(database_url).dispose()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    db = Database(database_url)
    with db.read() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    db.dispose()


def test_pusa_db_migrates_ahead_of_a_deploy(database_url: str, capsys: pytest.CaptureFixture) -> None:
    assert db_main(["current", database_url]) == 0
    assert capsys.readouterr().out.strip() == "(empty)"
    assert db_main(["upgrade", database_url]) == 0
    assert capsys.readouterr().out.strip() == HEAD
    assert db_main(["current", "postgresql+psycopg://pusa@127.0.0.1:9/none"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pusa-db: error: ") and "Connection refused" in err and err.count("\n") == 1


# -- submission and reads --------------------------------------------------------------------------


def test_create_get_and_events(store: JobStore) -> None:
    job = add(store, inputs={"images[0]": "inputs/x/images[0]"})
    got = store.get(job.id)
    assert got.model_dump(exclude={"abandon_at"}) == job.model_dump(exclude={"abandon_at"})
    assert (got.status, got.version, got.lease_holder) == ("queued", 1, None)
    assert store.events_after(job.id, -1) == [{"type": "queued", "position": 1, "seq": 0}]
    assert store.events_after(job.id, 0) == []
    for missing in (new_job_id(), "../etc/passwd", ""):
        with pytest.raises(KeyError):
            store.get(missing)


def test_list_pages_by_owner_in_creation_order(store: JobStore) -> None:
    made = [make_job(T0 + i, owner="alice" if i % 2 == 0 else "bob") for i in range(9)]
    for job in random.Random(0).sample(made, len(made)):
        store.create(job, {"type": "queued"})
    alice = [j.id for j in made if j.owner == "alice"]

    def page(**kwargs: Any) -> list[str]:
        return [job.id for job in store.list(owner="alice", **kwargs)]

    assert page() == alice[::-1]
    assert page(limit=2) == [alice[4], alice[3]]
    assert page(limit=2, after=alice[3]) == [alice[2], alice[1]]
    assert page(limit=2, after=alice[0]) == []
    assert page(limit=2, order="asc") == alice[:2]
    assert page(limit=3, order="asc", after=alice[1]) == alice[2:5]
    store.delete(alice[3])  # a cursor that no longer exists still pages on
    assert page(limit=2, after=alice[3]) == [alice[2], alice[1]]
    assert [j.id for j in store.list(limit=100, owner=None, order="asc")] == [j.id for j in made if j.id != alice[3]]
    assert store.list(owner="carol") == []
    with pytest.raises(KeyError):
        store.list(after="not-a-video-id")


def test_listing_reads_one_page_through_the_index(store: JobStore, db: Database) -> None:
    """Listing walks a (created_at, id)-ordered index and stops after a page: no table scan, no sort."""
    for i in range(300):
        store.create(make_job(T0 + i, owner=f"o{i % 3}"), {"type": "queued"})
    for owner in ("o1", None):
        query = store.list_query(20, new_job_id(T0 + 200), "desc", owner)
        sql = str(query.compile(db.engine, compile_kwargs={"literal_binds": True}))
        with db.read() as conn:
            if db.dialect == "sqlite":
                plan = " ".join(row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
                assert "USING INDEX ix_jobs_" in plan and "TEMP B-TREE" not in plan, plan
            else:
                conn.exec_driver_sql("ANALYZE jobs")
                plan = " ".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN {sql}"))
                assert "Index Scan" in plan and "Seq Scan" not in plan and "Sort" not in plan, plan
            assert "ix_jobs_owner_created" in plan or "ix_jobs_created" in plan, plan


def test_queue_position_counts_older_queued_jobs(store: JobStore) -> None:
    a, b, c = (add(store, T0 + i) for i in range(3))
    assert [store.queue_position(store.get(j.id)) for j in (a, b, c)] == [1, 2, 3]
    assert store.queued_count() == 3
    lease = store.claim("r1")
    assert lease.job_id == a.id
    assert store.queue_position(store.get(a.id)) is None
    assert [store.queue_position(store.get(j.id)) for j in (b, c)] == [1, 2]
    assert store.queued_count() == 2


def test_idempotency_key_returns_the_first_job(store: JobStore) -> None:
    first = add(store, idempotency_key="k1", request_hash="h1")
    again = store.create(make_job(idempotency_key="k1", request_hash="h1"), {"type": "queued"})
    assert again.id == first.id
    with pytest.raises(IdempotencyConflict):
        store.create(make_job(idempotency_key="k1", request_hash="h2"), {"type": "queued"})
    other_owner = store.create(make_job(owner="bob", idempotency_key="k1", request_hash="h2"), {"type": "queued"})
    assert other_owner.id != first.id
    assert len(store.list(owner=None)) == 2


# -- leases ----------------------------------------------------------------------------------------


def test_claim_takes_the_oldest_and_each_job_once(store: JobStore) -> None:
    a, b = add(store, T0), add(store, T0 + 1)
    first, second = store.claim("r1"), store.claim("r2")
    assert (first.job_id, second.job_id) == (a.id, b.id)
    assert store.claim("r3") is None
    assert (first.epoch, first.version, first.job.status, first.job.takeovers) == (1, 1, "in_progress", 0)
    assert not first.resumed and store.get(a.id).lease_holder == "r1"


def test_concurrent_claims_take_every_job_exactly_once(store: JobStore) -> None:
    ids = {add(store, T0 + i).id for i in range(40)}
    claimed: list[str] = []
    lock = threading.Lock()

    def claimer(name: str) -> None:
        while (lease := store.claim(name)) is not None:
            with lock:
                claimed.append(lease.job_id)

    threads = [threading.Thread(target=claimer, args=(f"r{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Counter(claimed) == Counter(ids)


def test_expired_lease_is_taken_over_and_the_old_holder_is_fenced_out(store: JobStore, db: Database) -> None:
    job = add(store)
    old = store.claim("r1")
    store.record(old, {"type": "encoding"})
    assert store.claim("r2") is None  # the lease is live
    expire_leases(db)
    assert store.claim("r1") is None  # never re-claims its own job
    new = store.claim("r2")
    assert (new.job_id, new.epoch, new.job.takeovers, new.version) == (job.id, 2, 1, 2)
    assert new.resumed and new.job.adopted and not old.job.adopted
    with pytest.raises(LeaseLost):
        store.record(old, {"type": "step", "step": 1}, progress=50)
    with pytest.raises(LeaseLost):
        store.finish(old, "completed", {"type": "completed"}, retention_s=60)
    store.record(new, {"type": "step", "step": 1}, progress=40)
    row = store.get(job.id)
    assert (row.progress, row.status, row.lease_holder, row.version) == (40, "in_progress", "r2", 3)
    assert [e["type"] for e in store.events_after(job.id, -1)] == ["queued", "encoding", "step"]


def test_renew_reports_the_leases_still_held(store: JobStore, db: Database) -> None:
    a, b = add(store, T0), add(store, T0 + 1)
    la, lb = store.claim("r1"), store.claim("r1")
    expire_leases(db)
    taken = store.claim("r2")
    assert taken.job_id == a.id
    assert store.renew("r1", {a.id: la.epoch, b.id: lb.epoch}) == {b.id: lb.epoch}
    assert store.get(b.id).lease_expires_at > time.time()
    assert la.job_id not in store.renew("r1", {la.job_id: la.epoch})
    assert store.renew("r1", {}) == {}


def test_renew_does_not_wait_for_a_job_whose_row_a_write_holds(store: JobStore, db: Database,
                                                                database_url: str) -> None:
    """A job's row locked by a write in flight (here: an open transaction that updated it) does not hold up the
    renewal of the holder's other jobs; it is reported held, as its committed row says, and renewed later."""
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite has no row locks: its writes take turns")
    a, b = add(store, T0), add(store, T0 + 1)
    la, lb = store.claim("r1"), store.claim("r1")
    before = store.get(b.id).lease_expires_at
    time.sleep(0.01)
    with db.engine.connect() as conn, conn.begin():
        conn.execute(update(jobs).where(jobs.c.id == a.id).values(progress=5))  # a's row locked until the end
        renewed: dict = {}
        renew = threading.Thread(target=lambda: renewed.update(store.renew("r1", {a.id: la.epoch, b.id: lb.epoch})))
        renew.start()
        renew.join(timeout=10)
        assert not renew.is_alive(), "renew waited for the locked row"
    assert renewed == {a.id: la.epoch, b.id: lb.epoch}
    assert store.get(b.id).lease_expires_at > before
    assert store.renew("r1", {a.id: la.epoch}) == {a.id: la.epoch}  # renewed once the lock is gone


def test_release_lets_another_router_resume_at_once(store: JobStore) -> None:
    job = add(store)
    lease = store.claim("r1")
    store.record(lease, {"type": "step", "step": 1}, checkpoint_step=1, checkpoint_key="checkpoints/x/e1-s1.npy")
    store.release(lease, {"type": "released", "step": 1})
    resumed = store.claim("r2")
    assert (resumed.job_id, resumed.epoch, resumed.job.takeovers) == (job.id, 3, 0)  # a release is no takeover
    assert resumed.resumed and not resumed.job.adopted
    assert (resumed.job.checkpoint_step, resumed.job.checkpoint_key) == (1, "checkpoints/x/e1-s1.npy")
    with pytest.raises(LeaseLost):
        store.record(lease, {"type": "step", "step": 2})


def test_a_retried_write_whose_commit_was_not_acknowledged_applies_once(store: JobStore) -> None:
    job = add(store)
    lease = store.claim("r1")
    store.record(lease, {"type": "step", "step": 1}, progress=10)
    lease.version -= 1  # as if the commit's acknowledgement had been lost: the write is retried
    store.record(lease, {"type": "step", "step": 1}, progress=10)
    assert lease.version == 2
    assert [e["seq"] for e in store.events_after(job.id, -1)] == [0, 1]
    store.record(lease, {"type": "step", "step": 2})
    assert [e.get("step") for e in store.events_after(job.id, 0)] == [1, 2]


def test_flags_from_other_replicas_come_back_with_each_write(store: JobStore, db: Database) -> None:
    job = add(store)
    lease = store.claim("r1")
    assert store.record(lease, {"type": "encoding"}).cancel is False
    store.request_cancel(job.id)
    signals = store.record(lease, {"type": "step", "step": 1})
    assert signals.cancel and not signals.delete and not signals.abandoned
    assert store.get(job.id).status == "in_progress"  # the holder ends it, not the requester

    streamed = store.create(make_job(), {"type": "queued"}, abandon_after_s=0.2)
    held = store.claim("r1")
    assert held.job_id == streamed.id and not store.record(held, {"type": "encoding"}).abandoned
    store.keep_watching(streamed.id, 60)  # a client streams it: the deadline moves on
    time.sleep(0.3)
    assert not store.record(held, {"type": "step", "step": 1}).abandoned
    with db.write() as conn:
        conn.execute(update(jobs).where(jobs.c.id == streamed.id).values(abandon_at=time.time() - 1))
    assert store.record(held, {"type": "step", "step": 2}).abandoned
    plain = add(store)
    store.keep_watching(plain.id, 60)  # a job not made by a stream has no deadline to move
    assert store.get(plain.id).abandon_at is None


def test_cancel_of_a_queued_job_ends_it_at_once(store: JobStore) -> None:
    job = add(store)
    store.request_cancel(job.id)
    row = store.get(job.id)
    assert row.status == "cancelled" and row.completed_at is not None
    assert [e["type"] for e in store.events_after(job.id, -1)] == ["queued", "cancelled"]
    assert store.claim("r1") is None


def test_finish_ends_releases_and_queues_the_webhook(store: JobStore, db: Database) -> None:
    job = add(store)
    lease = store.claim("r1")
    store.record(lease, {"type": "step", "step": 1}, checkpoint_step=1, checkpoint_key="k")
    hook = delivery(job.id, "completed", "http://hooks.example/pusa")
    before = time.time()
    signals = store.finish(lease, "completed", {"type": "completed", "url": "u"}, retention_s=3600, progress=100,
                           webhook=hook)
    assert not signals.delete
    row = store.get(job.id)
    assert (row.status, row.progress, row.lease_holder, row.checkpoint_key) == ("completed", 100, None, None)
    assert before + 3600 <= row.expires_at <= time.time() + 3600
    assert job.id not in store.renew("r1", {job.id: lease.epoch})
    with db.read() as conn:
        outbox = conn.execute(select(webhook_deliveries)).one()
    assert (outbox.job_id, outbox.event_type, outbox.state, outbox.url) == (
        job.id, "video.completed", "pending", "http://hooks.example/pusa")


def test_delete_of_a_running_job_waits_for_its_holder(store: JobStore) -> None:
    queued, running = add(store, T0), add(store, T0 + 1)
    assert store.request_delete(queued.id) is True  # nobody runs it: the caller removes it now
    lease = store.claim("r1")
    assert lease.job_id == running.id
    assert store.request_delete(running.id) is False
    with pytest.raises(KeyError):  # hidden at once
        store.get(running.id)
    assert running.id not in [j.id for j in store.list(owner=None)]
    signals = store.record(lease, {"type": "step", "step": 1})
    assert signals.cancel and signals.delete
    assert store.finish(lease, "cancelled", {"type": "cancelled"}, retention_s=60).delete


def test_retention_lists_and_deletes_expired_jobs(store: JobStore, db: Database) -> None:
    old, fresh, running = add(store, T0), add(store, T0 + 1), add(store, T0 + 2)
    for job, retention in ((old, 0.05), (fresh, 3600)):
        lease = store.claim("r1")
        assert lease.job_id == job.id
        store.finish(lease, "completed", {"type": "completed"}, retention_s=retention)
    store.claim("r1")  # `running` stays in progress: never expires
    time.sleep(0.1)
    assert store.expired() == [old.id]
    assert store.delete_expired(old.id) and not store.delete_expired(fresh.id)
    with pytest.raises(KeyError):
        store.get(old.id)
    with db.read() as conn:
        assert conn.execute(select(func.count()).select_from(job_events)
                            .where(job_events.c.job_id == old.id)).scalar_one() == 0
    assert store.expired() == [] and store.get(running.id).status == "in_progress"


# -- keys and quotas -------------------------------------------------------------------------------


def test_concurrent_requests_of_one_key_never_overshoot_its_quotas(store: JobStore, db: Database) -> None:
    limits = Quotas(jobs_per_minute=3, gpu_seconds_per_day=100.0)
    outcomes: list[str] = []
    lock = threading.Lock()

    def submit(i: int) -> None:
        charge = Charge(owner="key_a", gpu_seconds=20.0, quotas=limits, at=time.time(), busy_retry_s=30)
        try:
            store.create(make_job(owner="key_a"), {"type": "queued", "position": 1}, charge=charge)
            outcome = "accepted"
        except QuotaExceeded as exc:
            outcome = exc.quota
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Counter(outcomes) == {"accepted": 3, "jobs_per_minute": 5}  # checked and charged under one lock
    with db.read() as conn:
        assert conn.execute(select(func.sum(usage.c.gpu_seconds)).where(usage.c.owner == "key_a")).scalar_one() == 60
    other = Charge(owner="key_b", gpu_seconds=20.0, quotas=limits, at=time.time(), busy_retry_s=30)
    store.check_quotas(other)  # another key's charges are its own

    day = Charge(owner="key_a", gpu_seconds=50.0, quotas=Quotas(gpu_seconds_per_day=100.0), at=time.time(),
                 busy_retry_s=30)
    with pytest.raises(QuotaExceeded) as refused:  # 60 used + 50 > 100: room once the first 20 leave the window
        store.check_quotas(day)
    assert refused.value.quota == "gpu_seconds_per_day" and 86390 <= refused.value.retry_after_s <= 86400
    with db.write() as conn:  # a day later
        conn.execute(update(usage).values(created_at=usage.c.created_at - 86401))
    assert store.prune_usage() == 3
    store.check_quotas(day)


def test_keys_are_stored_hashed_and_revoked_at_once(db: Database) -> None:
    keys = KeyStore(db)
    key, secret = keys.create("alice", "admin", Quotas(max_concurrent_jobs=2))
    assert keys.authenticate(secret) == key and key.role == "admin" and key.quotas.max_concurrent_jobs == 2
    with db.read() as conn:
        stored = conn.execute(select(api_keys)).one()._mapping
    assert secret not in json.dumps({k: v for k, v in stored.items()}, default=str)
    assert keys.authenticate(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert keys.authenticate("not-a-key") is None
    assert keys.revoke(key.id) and not keys.revoke(key.id)
    assert keys.authenticate(secret) is None
    assert [k.revoked_at is not None for k in keys.list()] == [True]
