"""The control plane on the cluster's parts: a real PostgreSQL job database and a real S3 store
(SeaweedFS), two runner replicas, signed webhooks. Runners racing for orphaned jobs, PostgreSQL restarted
and S3 stopped mid-job, webhooks to a receiver that fails, and a redeploy and a downscale of the runners
while jobs run (they drain: each job is released after its step and resumed by another replica).

One service serves the module; the redeploy and downscale tests change it, so they come last.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import openai
import pytest
from ray.serve.schema import ServeDeploySchema
from s3server import s3_server_fixture
from service_probe import ServiceProbe, steps_done
from serving import local_config, new_version, running_service
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Engine
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from deployments.launch import deploy
from pusa_jobs.jobs import Job, job_created_at, job_plan, new_job_id
from pusa_jobs.schema import job_events
from pusa_model.presets import get_preset
from pusa_model.request import parse_request, plan_request

SECRET = "whsec_" + "cHVzYS10ZXN0LXdlYmhvb2stc2VjcmV0LTAxMjM0NTY3"  # base64 of a test key
BUCKET, PREFIX = "pusa-control", "jobs"
# Two jobs per runner: four jobs keep both runners busy, whichever one a downscale stops.
# Leases outlast any hold of a job's write by `EventGate` (a write held for longer commits an expired lease).
RUNNER = {"max_running_jobs": 2, "lease_ttl_s": 120.0, "renew_s": 1.0, "poll_s": 0.2, "drain_wait_s": 20, "sweep_s": 1.0,
          "stages": {"retries": 6, "backoff_s": 0.5, "backoff_max_s": 4}}
DEPLOYMENTS = {"DiT": {"autoscaling_config": None, "num_replicas": 2}, "Runner": {"num_replicas": 2}}
REPLICAS = {"DiT": 2, "Router": 1, "Runner": 2, "VAE": 1, "TextEncoder": 1}
SLOW = {"prompt": "a cat", "size": "1024x1024", "frames": 1}  # DiT steps of ~0.3 s here
FAST = {"prompt": "a cat", "size": "64x64", "frames": 17}


class Receiver:
    """A webhook receiver on loopback: answers 500 to the first `failures` deliveries of each message,
    then 200; keeps every request it got."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.requests.append((self.path, dict(self.headers), body))
                    tries = sum(1 for _, h, _ in receiver.requests if h["webhook-id"] == self.headers["webhook-id"])
                self.send_response(500 if tries <= receiver.failures else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def received(self, job_id: str) -> list[tuple[str, dict[str, str], bytes]]:
        with self.lock:
            return [r for r in self.requests if json.loads(r[2])["data"]["id"] == job_id]

    def wait(self, job_id: str, count: int, timeout: float = 30) -> list[tuple[str, dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout
        while len(got := self.received(job_id)) < count:
            assert time.monotonic() < deadline, f"{len(got)} of {count} deliveries for {job_id}"
            time.sleep(0.05)
        return got

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver(failures=2)
    yield r
    r.close()


s3 = s3_server_fixture(scope="module")


@pytest.fixture(scope="module")
def setup(s3, receiver, postgres_server, tmp_path_factory):
    database = postgres_server.create_database()
    env = {**s3.service_env(), "PUSA_WEBHOOK_SECRET": SECRET}
    args = {"webhooks": {"url": f"{receiver.url}/all", "backoff_s": 0.2, "max_attempts": 5,
                         "allow_private_receivers": True}}  # the receiver is on loopback
    store = f"s3://{BUCKET}/{PREFIX}"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        with running_service(store, runner=RUNNER, deployments=DEPLOYMENTS, env=env, args=args,
                             database=database) as url:
            probe = ServiceProbe(url, database, REPLICAS)
            try:
                yield probe, {"store": store, "database": database, "args": args, "port": urlparse(url).port}
            finally:
                probe.close()


@pytest.fixture
def svc(setup) -> ServiceProbe:
    probe, _ = setup
    probe.wait_ready()
    return probe


def stepped_once(events: list[dict], steps: int) -> bool:
    """Events numbered 0.. without a gap, every step reported exactly once, in order."""
    return [e["seq"] for e in events] == list(range(len(events))) and \
        [e["step"] for e in events if e["type"] == "step"] == list(range(1, steps + 1))


def orphaned_job(request: dict) -> Job:
    """A job some runner claimed and lost before its first step: in progress, its lease long expired."""
    plan = plan_request(parse_request(request), get_preset("tiny"))
    job_id = new_job_id()
    return Job(id=job_id, created_at=job_created_at(job_id), status="in_progress", request=plan.request.model_dump(),
               plan=job_plan(plan), lease_holder="runner-gone", lease_epoch=1, lease_expires_at=0.0)


class EventGate:
    """Holds a job's runner at its event writes, in the real PostgreSQL: an uncommitted `job_events` row of
    the next seq (in a transaction of the gate's own) makes the runner's insert of that seq wait on the
    primary key until the gate lets it go (rolls its row back). Reads, and the runner's writes that add no
    event (the claim, lease renewals), go on: the gate's rows skip the foreign-key check (a superuser's
    ``session_replication_role = replica``), whose lock on the job's row would hide the job from the
    claim (``FOR UPDATE SKIP LOCKED``)."""

    def __init__(self, engine: Engine, job_id: str) -> None:
        self.engine, self.job_id = engine, job_id
        self.held: dict[int, Connection] = {}

    def _hold(self, seq: int) -> bool:
        """Hold event `seq`; False if the runner wrote it already."""
        conn = self.engine.connect()
        conn.begin()
        conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
        row = dict(job_id=self.job_id, seq=seq, type="held", data={}, created_at=0.0)
        inserted = pg_insert(job_events).values(**row).on_conflict_do_nothing().returning(job_events.c.seq)
        if conn.execute(inserted).first() is not None:  # (rowcount is not told apart from a conflict)
            self.held[seq] = conn
            return True
        conn.close()
        return False

    def _let_go(self, seq: int) -> None:
        conn = self.held.pop(seq)
        conn.rollback()
        conn.close()

    def close(self) -> None:
        """Let every held write go."""
        for seq in sorted(self.held):
            self._let_go(seq)

    def hold(self, svc: ServiceProbe) -> None:
        """Hold the runner's next event write (and the one after it) from now on."""
        seq = len(svc.events(self.job_id))
        while not self._hold(seq):  # the runner wrote it meanwhile (the conflict waited for its commit)
            seq += 1
        assert self._hold(seq + 1)

    def stop_after(self, svc: ServiceProbe, last: Callable[[dict], bool], timeout: float = 120) -> dict:
        """Let the runner's events through one at a time until the last one written satisfies `last`; the
        runner's next event write then waits (until `close`). Returns that last event."""
        if not self.held:
            self.hold(svc)
        seq = min(self.held)
        deadline = time.monotonic() + timeout
        while True:  # held: seq (the runner's next event) and seq + 1; every event before seq is written
            events = svc.events(self.job_id)
            assert len(events) == seq, events[-3:]
            if last(events[-1]):
                return events[-1]
            self._let_go(seq)
            while len(svc.events(self.job_id)) == seq:  # the runner writes it, then waits at seq + 1
                assert time.monotonic() < deadline, f"no event {seq} in {timeout} s: {events[-3:]}"
                time.sleep(0.01)
            seq += 1
            assert self._hold(seq + 1)


def test_runners_racing_for_orphaned_jobs_run_each_exactly_once(svc):
    steps, count = 6, 8
    before = svc.dit_steps()
    jobs = [orphaned_job({"prompt": "a cat", "width": 64, "height": 64, "frames": 17, "steps": steps, "seed": 100 + i})
            for i in range(count)]
    for job in jobs:  # both runners see them claimable at once
        svc.jobs.create(job, {"type": "queued", "position": 1})
    for job in jobs:
        done = svc.wait_ended(job.id, timeout=120)
        assert done.status == "completed", done.error
        assert done.takeovers == 1  # taken from the lost holder once, by one runner
        events = svc.events(job.id)
        assert stepped_once(events, steps), events
        assert sum(1 for e in events if e.get("requeued")) == 1
    assert svc.dit_steps() - before == steps * count  # every step of every job ran exactly once


def test_postgres_restart_mid_job(svc, postgres_server):
    steps = 12
    ids = [svc.submit(**SLOW, steps=steps, seed=200 + i) for i in range(2)]
    svc.wait_steps(ids[0], 3)
    postgres_server.stop()
    time.sleep(3)
    postgres_server.start()
    for job_id in ids:
        job = svc.wait_ended(job_id, timeout=120)
        assert job.status == "completed", job.error
        assert stepped_once(svc.events(job_id), steps)
        assert svc.content(job_id)[4:8] == b"ftyp"


def _checkpoints(s3, job_id: str) -> list[str]:
    listed = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/checkpoints/{job_id}/")
    return sorted(item["Key"].rsplit("/", 1)[1] for item in listed.get("Contents", []))


def test_s3_outage_mid_job_and_while_the_video_is_written(svc, s3):
    """The runner is held at its event writes (`EventGate`) where S3 must go down: after step 2 (its later
    checkpoints and the video cannot be stored until S3 is back), and after the last step, once the
    previous checkpoint is removed, before the `decoding` event: nothing reaches S3 until the VAE stores
    the video, which fails until S3 is back. S3 stays down until the VAE's retry is recorded."""
    steps = 8
    request = {**SLOW, "steps": steps, "seed": 300}
    job_id = svc.submit(**request)
    gate = EventGate(svc.db.engine, job_id)
    try:
        gate.stop_after(svc, lambda e: e["type"] == "step" and e["step"] == 2)
        s3.stop()  # checkpoints cannot be written for a while
    finally:
        gate.close()
    time.sleep(4)
    s3.restart()
    job = svc.wait_ended(job_id, timeout=120)
    assert job.status == "completed", job.error
    assert stepped_once(svc.events(job_id), steps)
    first = svc.content(job_id)

    again = svc.submit(**request)
    gate = EventGate(svc.db.engine, again)
    try:
        gate.stop_after(svc, lambda e: e["type"] == "step" and e["step"] == steps)
        deadline = time.monotonic() + 30
        while not ((kept := _checkpoints(s3, again)) and len(kept) == 1 and kept[0].endswith(f"-s{steps}.npy")):
            assert time.monotonic() < deadline, kept  # until the runner has removed the one before
            time.sleep(0.05)
        s3.stop()  # the decoded video cannot be stored
    finally:
        gate.close()  # the runner records `decoding`; the VAE decodes and tries to store the video
    svc.wait_for(again, lambda j, e: any(x["type"] == "retry" and x["stage"] == "vae" for x in e) or j.terminal,
                 timeout=120)
    s3.restart()
    job = svc.wait_ended(again, timeout=120)
    assert job.status == "completed", job.error
    assert any(e["type"] == "retry" and e["stage"] == "vae" and "store unavailable" in e["reason"]
               for e in svc.events(again)), svc.events(again)
    assert svc.content(again) == first


def test_signed_webhooks_reach_a_receiver_that_fails_twice(svc, receiver):
    job_id, _ = svc.run(**FAST, steps=2, seed=400)
    deliveries = receiver.wait(job_id, 3)  # 500, 500, 200: at least once
    assert [path for path, _, _ in deliveries] == ["/all"] * 3
    assert len({headers["webhook-id"] for _, headers, _ in deliveries}) == 1  # one event, retried
    _, headers, body = deliveries[-1]
    event = Webhook(SECRET).verify(body, headers)
    assert (event["type"], event["data"], event["object"]) == ("video.completed", {"id": job_id}, "event")
    assert event["id"] == headers["webhook-id"]
    client = openai.OpenAI(api_key="unused", webhook_secret=SECRET, base_url="http://127.0.0.1:9/v1")
    client.webhooks.verify_signature(body, headers)  # the openai SDK's verifier accepts it too
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace(job_id.encode(), new_job_id().encode()), headers)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.verify_signature(body + b" ", headers)

    # a request's own webhook_url, and the other endings
    response = svc.http.post("/v1/videos", json={**SLOW, "steps": 40, "seed": 401,
                                                 "webhook_url": f"{receiver.url}/mine"})
    assert response.status_code == 200, response.text
    cancelled = response.json()["id"]
    svc.wait_steps(cancelled, 1)
    svc.http.post(f"/v1/videos/{cancelled}/cancel")
    path, headers, body = receiver.wait(cancelled, 3)[-1]
    assert path == "/mine" and Webhook(SECRET).verify(body, headers)["type"] == "video.cancelled"
    for url in ("ftp://example.com/hook", "http:///no-host", "http://a b/", "https://x/\x00", 42):
        bad = svc.http.post("/v1/videos", json={**FAST, "webhook_url": url})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "webhook_url", (url, bad.text)


def test_idempotency_key_makes_one_job(svc):
    body = {**FAST, "steps": 2, "seed": 500}
    first = svc.http.post("/v1/videos", json=body, headers={"Idempotency-Key": "order-500"})
    again = svc.http.post("/v1/videos", json=body, headers={"Idempotency-Key": "order-500"})
    assert first.status_code == again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other = svc.http.post("/v1/videos", json={**body, "seed": 501}, headers={"Idempotency-Key": "order-500"})
    assert other.status_code == 409 and other.json()["error"]["param"] == "Idempotency-Key"
    too_long = svc.http.post("/v1/videos", json=body, headers={"Idempotency-Key": "k" * 256})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "Idempotency-Key"
    assert svc.wait_ended(first.json()["id"], timeout=60).status == "completed"


def test_expired_jobs_lose_their_record_and_s3_files(svc, s3):
    job_id, _ = svc.run(**FAST, steps=2, seed=600)
    objects = lambda: [o["Key"] for o in s3.client().list_objects_v2(  # noqa: E731
        Bucket=BUCKET, Prefix=f"{PREFIX}/results/{job_id}/").get("Contents", [])]
    assert len(objects()) == 2
    svc.expire(job_id)  # as if its retention period had passed
    assert objects() == [] and svc.events(job_id) == []


def _redeploy(setup, change) -> list[str]:
    """Deploy the module's config changed by `change(app_config)`; returns the problems once it runs (or not,
    in 180 s)."""
    probe, conf = setup
    config = local_config(conf["store"], conf["port"], runner=RUNNER, deployments=DEPLOYMENTS, args=conf["args"],
                          database=conf["database"])
    change(config["applications"][0])
    return deploy(ServeDeploySchema.model_validate(config), 180)


# Jobs of many steps; each is held at its event writes (`EventGate`) until its runner drains, so that it is
# mid-run when Serve stops that runner, however fast the machine runs the steps.
LONG = {**SLOW, "steps": 50}
HELD_AT = 2  # the gates stop each job after this step: its next step's event waits for the drain


def _redeploy_while_held(setup, svc: ServiceProbe, change, seeds: list[int], stopped: int) -> list[str]:
    """Submit a `LONG` job of each seed and redeploy with `change` while the jobs are held after step `HELD_AT`:
    each job is let go once the runner that holds it drains (that runner then releases it after this whole
    step), and the others, which run on a runner Serve keeps, once the `stopped` jobs of the stopped runners
    were let go. Returns the jobs' ids."""
    gates: dict[str, EventGate] = {}
    try:
        for seed in seeds:  # each held from its submission: none runs on while another one is walked to its gate
            job_id = svc.submit(**LONG, seed=seed)
            gates[job_id] = EventGate(svc.db.engine, job_id)
            gates[job_id].hold(svc)
        ids = list(gates)
        for job_id in ids:
            gates[job_id].stop_after(svc, lambda e: e["type"] == "step" and e["step"] == HELD_AT)
        holders = {job_id: svc.record(job_id).lease_holder for job_id in ids}
        assert len(set(holders.values())) == 2, holders  # both runners run jobs
        problems: list = []

        def run_redeploy() -> None:
            try:
                problems.extend(_redeploy(setup, change) or ["done"])
            except Exception as exc:
                problems.append(repr(exc))

        redeploy = threading.Thread(target=run_redeploy)
        redeploy.start()
        drained, deadline = set(), time.monotonic() + 180
        while len(drained) < stopped:
            draining = {holder for holder, is_draining in svc.runners().items() if is_draining}
            for job_id in set(ids) - drained:
                if holders[job_id] in draining:
                    gates[job_id].close()
                    drained.add(job_id)
            assert time.monotonic() < deadline and problems in ([], ["done"]), (problems, drained)
            time.sleep(0.05)
    finally:
        for gate in gates.values():  # the undisturbed jobs (and all of them if the test failed)
            gate.close()
    redeploy.join(timeout=180)
    assert problems == ["done"], problems
    return ids


def _steps_since_release(events: list[dict]) -> int:
    released = [e["seq"] for e in events if e["type"] == "released"]
    return sum(1 for e in events if e["type"] == "step" and released and e["seq"] > released[-1])


def _drained_jobs_resume(svc: ServiceProbe, ids: list[str], stopped: int) -> None:
    """The `stopped` jobs of the runners Serve stopped were released after a whole step (the one in flight when
    the drain began) and resumed by another runner at the next step; the others ran on undisturbed. Jobs are
    cancelled once that is seen (the undisturbed ones first, making room); each ends with every step reported
    exactly once and no lease ever lost."""
    was_released = lambda job_id: any(e["type"] == "released" for e in svc.events(job_id))  # noqa: E731
    deadline = time.monotonic() + 60
    while len(released := [j for j in ids if was_released(j)]) < stopped:
        assert time.monotonic() < deadline, [(svc.record(j).status, svc.events(j)[-2:]) for j in ids]
        time.sleep(0.1)
    assert len(released) == stopped
    for job_id in set(ids) - set(released):
        svc.http.post(f"/v1/videos/{job_id}/cancel")
    resuming, deadline = set(released), time.monotonic() + 180
    while resuming:
        for job_id in [j for j in resuming if _steps_since_release(svc.events(j)) >= 2]:
            svc.http.post(f"/v1/videos/{job_id}/cancel")
            resuming.discard(job_id)
        assert time.monotonic() < deadline, f"not resumed: {resuming}"
        time.sleep(0.1)
    for job_id in ids:
        job = svc.wait_ended(job_id, timeout=60)
        assert job.status == "cancelled" and job.takeovers == 0, job
        events = svc.events(job_id)
        assert stepped_once(events, steps_done(events)), events
        if job_id in released:  # after the step in flight when its runner began to drain: step HELD_AT + 1,
            # or HELD_AT + 2 when HELD_AT + 1 had come back and was being written, with HELD_AT + 2 started ahead
            release = next(e for e in events if e["type"] == "released")
            assert release["step"] in (HELD_AT + 1, HELD_AT + 2), events
            assert release["step"] == steps_done(events[:release["seq"]]), events


def test_runner_redeploy_during_jobs_drains_them(setup, svc):
    def runner_version_2(app: dict) -> None:  # Serve replaces every runner replica (and only those)
        new_version(app, "Runner", "2")

    ids = _redeploy_while_held(setup, svc, runner_version_2, [700, 701, 702], stopped=3)
    _drained_jobs_resume(svc, ids, stopped=3)  # every runner was replaced


def test_runner_downscale_during_jobs_drains_them(setup, svc):
    def one_runner(app: dict) -> None:  # the same version (as redeployed above), one replica fewer
        new_version(app, "Runner", "2")
        for dep in app["deployments"]:
            if dep["name"] == "Runner":
                dep["num_replicas"] = 1

    ids = _redeploy_while_held(setup, svc, one_runner, [800, 801, 802, 803], stopped=2)  # two jobs on each runner
    svc.replica_counts = {**REPLICAS, "Runner": 1}
    _drained_jobs_resume(svc, ids, stopped=2)
