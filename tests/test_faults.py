"""Faults on a real local Ray, over real HTTP: a DiT replica lost mid-job, cancellation, router
restarts, and LoRA-alpha routing across DiT replicas.

One service serves the whole module (starting one takes most of a minute here): two DiT replicas
without autoscaling, fast health checks (so Serve replaces a killed replica within seconds) and a
runner that heartbeats every 0.5 s, adopts jobs 3 s stale and gives up on a job after its router
has been lost twice (`max_attempts: 1`).
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
import ray
from ray import serve
from ray.exceptions import RayError

from deployments.jobs import TERMINAL, Job, JobStore
from deployments.storage import open_store
from serving import running_service

RUNNER = {"heartbeat_s": 0.5, "stale_after_s": 3.0, "max_attempts": 1}
DEPLOYMENTS = {
    "DiT": {"autoscaling_config": None, "num_replicas": 2, "health_check_period_s": 1},
    "Router": {"health_check_period_s": 1},
}
# One 1024x1024 frame: a DiT step of the tiny model takes ~0.3 s on a CPU core (attention over
# 4096 tokens) while the VAE decodes in a few seconds; 64x64 steps take milliseconds.
SLOW = {"prompt": "a cat", "size": "1024x1024", "frames": 1}
FAST = {"prompt": "a cat", "size": "64x64", "frames": 17}
DIT_PREFIX = "SERVE_REPLICA::pusa#DiT#"
ROUTER_PREFIX = "SERVE_REPLICA::pusa#Router#"


class Service:
    """The running service: HTTP for the API, the store for job records, Ray for replicas."""

    def __init__(self, url: str, store: str) -> None:
        self.url = url
        self.jobs = JobStore(open_store(store))
        self.http = httpx.Client(base_url=url, timeout=30)

    # -- HTTP ----------------------------------------------------------------------------------

    def submit(self, **fields) -> str:
        response = self.http.post("/v1/videos", json=fields)
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def retrieve(self, job_id: str) -> dict:
        response = self.http.get(f"/v1/videos/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def content(self, job_id: str) -> bytes:
        response = self.http.get(f"/v1/videos/{job_id}/content")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "video/mp4"
        return response.content

    def sse_events(self, job_id: str) -> list[dict]:
        """The job's events through `GET /v1/videos/{id}/events` (the job has ended, so it closes)."""
        text = self.http.get(f"/v1/videos/{job_id}/events", timeout=60).text
        return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]

    # -- store ---------------------------------------------------------------------------------

    def record(self, job_id: str) -> Job:
        return self.jobs.get(job_id)

    def wait_for(self, job_id: str, what, timeout: float, poll: float = 0.05) -> Job:
        """Poll the job's record until `what(job)` holds; fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.record(job_id)
            if what(job):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s; job is {job.status}: {job.events[-3:]}")
            time.sleep(poll)

    def wait_ended(self, job_id: str, timeout: float) -> Job:
        """Wait for a terminal status (bounded: a job left in_progress fails the test)."""
        return self.wait_for(job_id, lambda j: j.terminal, timeout, poll=0.2)

    def run(self, timeout: float = 120, **fields) -> tuple[str, bytes]:
        job_id = self.submit(**fields)
        job = self.wait_ended(job_id, timeout)
        assert job.status == "completed", job.error
        return job_id, self.content(job_id)

    # -- Ray -----------------------------------------------------------------------------------

    def replicas(self, prefix: str) -> list[tuple[str, ray.actor.ActorHandle]]:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
        return [(name, ray.get_actor(name, namespace="serve")) for name in names]

    def wait_ready(self, timeout: float = 120) -> None:
        """Every deployment healthy with its replicas running (after a kill, the replacement too)."""
        deadline = time.monotonic() + timeout
        while True:
            app = serve.status().applications.get("pusa")
            deps = app.deployments if app else {}
            running = {name: dep.replica_states.get("RUNNING", 0) for name, dep in deps.items()}
            healthy = bool(deps) and all(dep.status.value == "HEALTHY" for dep in deps.values())
            if healthy and running.get("DiT") == 2 and running.get("Router") == 1 and \
                    len(self.replicas(DIT_PREFIX)) == 2:
                try:
                    if self.http.get("/health", timeout=5).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            assert time.monotonic() < deadline, f"service not ready: {running}"
            time.sleep(0.25)

    def dit_stats(self) -> dict[int, dict]:
        """`DiT.stats()` of every DiT replica, by pid (concurrent calls through the handle spread
        over the replicas, as each takes one request at a time)."""
        handle = serve.get_deployment_handle("DiT", app_name="pusa")
        want = len(self.replicas(DIT_PREFIX))
        stats: dict[int, dict] = {}
        for _ in range(20):
            for response in [handle.stats.remote() for _ in range(6)]:
                try:
                    s = response.result(timeout_s=30)
                except RayError:  # a replica that just died
                    continue
                stats[s["pid"]] = s
            if len(stats) >= want:
                return stats
        raise AssertionError(f"reached {len(stats)} of {want} DiT replicas")

    def kill_busy_dit(self) -> str | None:
        """Kill the DiT replica that is running a request now (None if none was)."""
        for name, actor in self.replicas(DIT_PREFIX):
            try:
                busy = ray.get(actor.get_num_ongoing_requests.remote(), timeout=5)
            except RayError:
                continue
            if busy:
                ray.kill(actor, no_restart=False)
                return name
        return None


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    store = str(tmp_path_factory.mktemp("faults") / "store")
    with running_service(store, runner=RUNNER, deployments=DEPLOYMENTS) as url:
        svc = Service(url, store)
        try:
            yield svc
        finally:
            svc.http.close()


@pytest.fixture
def svc(service):
    service.wait_ready()
    return service


def steps_done(job: Job) -> int:
    return sum(1 for e in job.events if e["type"] == "step")


def test_dit_replica_lost_mid_job_costs_one_step(svc):
    request = {**SLOW, "steps": 10, "seed": 11}
    _, expected = svc.run(**request)

    job_id = svc.submit(**request)
    svc.wait_for(job_id, lambda j: steps_done(j) >= 3, timeout=60, poll=0.02)
    killed = []
    while True:  # the step can end between finding its replica and killing it: then try again
        name = svc.kill_busy_dit()
        if name:
            killed.append(name)
            try:
                svc.wait_for(job_id, lambda j: any(e["type"] == "retry" for e in j.events), timeout=5)
                break
            except AssertionError:
                pass
        job = svc.record(job_id)
        assert not job.terminal and steps_done(job) < 8 and len(killed) < 3, \
            f"no retry after killing {killed}; job {job.status}: {job.error}"
        time.sleep(0.01)
    job = svc.wait_ended(job_id, timeout=120)
    assert killed
    assert job.status == "completed", job.error

    events = svc.sse_events(job_id)
    types = [e["type"] for e in events]
    assert "retry" in types, types
    retry = next(e for e in events if e["type"] == "retry")
    assert retry["reason"] in ("ActorDiedError", "RayActorError", "ActorUnavailableError"), retry
    # only the step in flight was lost: every step reported once, in order, the job never restarted
    assert [e["step"] for e in events if e["type"] == "step"] == list(range(1, 11))
    assert types.count("encoding") == 1 and types[-1] == "completed"
    assert svc.content(job_id) == expected  # same seed, same video, though a replica died mid-step


def test_cancel_frees_the_dit_within_a_step(svc):
    steps = 50
    before = sum(s["steps_run"] for s in svc.dit_stats().values())
    job_id = svc.submit(**SLOW, steps=steps, seed=3)
    svc.wait_for(job_id, lambda j: steps_done(j) >= 3, timeout=60)

    t0 = time.monotonic()
    view = svc.http.post(f"/v1/videos/{job_id}/cancel").json()
    # steps recorded when the cancel marker was already there (progress = 2 + 93 k / N)
    marked = max(k for k in range(steps + 1) if 2 + int(93 * k / steps) <= view["progress"])
    while (status := svc.retrieve(job_id)["status"]) not in TERMINAL and time.monotonic() - t0 < 30:
        time.sleep(0.02)
    latency = time.monotonic() - t0
    assert status == "cancelled"

    job = svc.record(job_id)
    step_times = [e["elapsed_s"] for e in job.events if e["type"] == "step"]
    longest_step = max(b - a for a, b in zip(step_times, step_times[1:]))
    assert latency < longest_step + 1.0, (latency, longest_step)
    cancelled = job.events[-1]
    assert cancelled["type"] == "cancelled" and cancelled["step"] == steps_done(job) < steps
    assert cancelled["step"] <= marked + 1, (cancelled, marked)  # at most the step in flight ran on

    ran = sum(s["steps_run"] for s in svc.dit_stats().values()) - before
    assert ran == cancelled["step"]  # the DiT ran exactly the steps the job reported ...
    time.sleep(max(1.0, 3 * longest_step))
    assert sum(s["steps_run"] for s in svc.dit_stats().values()) - before == ran  # ... and then stopped
    assert svc.http.get(f"/v1/videos/{job_id}/content").status_code == 409


def test_lora_alpha_switches_refuse_from_the_base_weights(svc):
    request = {**FAST, "steps": 12, "seed": 21}
    longer = {**FAST, "steps": 40, "seed": 22}

    def fuse_everywhere(alpha: float) -> bytes:
        """Run `request` at `alpha` beside a longer job at `alpha` until every DiT replica holds it
        (while one replica runs a step, Serve sends the other job's step to the other replica,
        which fuses `alpha`); the video of `request`. The longer job decodes well after `request`:
        see `test_concurrent_jobs_with_one_seed_make_one_video`."""
        videos = set()
        for _ in range(4):
            ids = [svc.submit(**request, lora_alpha=alpha), svc.submit(**longer, lora_alpha=alpha)]
            for job_id in ids:
                job = svc.wait_ended(job_id, timeout=120)
                assert job.status == "completed", job.error
            videos.add(svc.content(ids[0]))
            if {s["lora_alpha"] for s in svc.dit_stats().values()} == {alpha}:
                assert len(videos) == 1  # whichever replica ran which step
                return videos.pop()
        raise AssertionError(f"DiT replicas hold {svc.dit_stats()} after jobs at alpha {alpha}")

    first = fuse_everywhere(1.0)
    assert fuse_everywhere(2.0) != first  # every replica went 1.0 -> 2.0; the alpha matters

    _, again = svc.run(**request, lora_alpha=1.0)  # every step ran on a replica gone 2.0 -> 1.0
    assert again == first  # re-fused from the base weights: nothing accumulated
    # (until Serve learns which replica holds 1.0, a step may go to either and re-fuse there)
    held = {s["lora_alpha"] for s in svc.dit_stats().values()}
    assert 1.0 in held and held <= {1.0, 2.0}, held


def test_concurrent_jobs_with_one_seed_make_one_video(svc):
    request = {**FAST, "steps": 8, "seed": 31}
    ids = [svc.submit(**request) for _ in range(2)]
    for job_id in ids:
        assert svc.wait_ended(job_id, timeout=120).status == "completed"
    assert svc.content(ids[0]) == svc.content(ids[1])


def test_router_restart_never_leaves_a_job_stuck(svc):
    request = {**FAST, "steps": 40, "seed": 5}

    def kill_router() -> None:
        routers = svc.replicas(ROUTER_PREFIX)
        assert routers
        for _, actor in routers:
            ray.kill(actor, no_restart=False)

    # lost once: adopted by the new router replica, run again from the start, completed
    job_id = svc.submit(**request)
    svc.wait_for(job_id, lambda j: steps_done(j) >= 2, timeout=60)
    kill_router()
    job = svc.wait_ended(job_id, timeout=90)
    assert job.status == "completed", job.error
    assert job.attempts == 1
    requeued = [e for e in job.events if e["type"] == "queued" and e.get("requeued")]
    assert len(requeued) == 1, job.events
    after = job.events[job.events.index(requeued[0]):]
    assert [e["step"] for e in after if e["type"] == "step"] == list(range(1, 41))
    svc.wait_ready()
    assert svc.retrieve(job_id)["status"] == "completed"
    assert [e["type"] for e in svc.sse_events(job_id)].count("queued") == 2
    assert svc.content(job_id)

    # lost twice (max_attempts 1): failed with router_lost, not in_progress forever
    job_id = svc.submit(**request)
    svc.wait_for(job_id, lambda j: steps_done(j) >= 2, timeout=60)
    kill_router()
    svc.wait_for(job_id, lambda j: any(e.get("requeued") for e in j.events), timeout=60, poll=0.02)
    kill_router()
    job = svc.wait_ended(job_id, timeout=90)
    assert job.status == "failed"
    assert job.error["code"] == "router_lost", job.error
    assert job.events[-1]["type"] == "failed"
    svc.wait_ready()
    view = svc.retrieve(job_id)
    assert view["status"] == "failed" and view["error"]["code"] == "router_lost"
