"""A running service as fault tests see it: its HTTP API, its job database, and its Ray replicas (to
count DiT steps, kill a replica, or freeze one so that it hangs)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import ray
import torch
from ray import serve
from ray.exceptions import RayActorError, RayError
from sqlalchemy import update

from pusa_jobs.db import Database
from pusa_jobs.job_store import JobStore
from pusa_jobs.jobs import Job
from pusa_jobs.schema import jobs
from pusa_model.request import replan

PREFIX = "SERVE_REPLICA::pusa#{}#"


def steps_done(job: Job | list[dict]) -> int:
    """Step events of a job (from its record's events or a list of events)."""
    return sum(1 for e in job if e["type"] == "step")


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: CPU matmuls sum in a different order with another thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class ServiceProbe:
    """The service at `url` with its job database at `database`; `replicas` sets how many replicas of each
    deployment `wait_ready` waits for."""

    def __init__(self, url: str, database: str, replicas: dict[str, int]) -> None:
        self.url = url
        self.db = Database(database)
        self.jobs = JobStore(self.db)
        self.http = httpx.Client(base_url=url, timeout=30)
        self.replica_counts = replicas

    def close(self) -> None:
        self.http.close()
        self.db.dispose()

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

    # -- the database --------------------------------------------------------------------------

    def record(self, job_id: str) -> Job:
        return self.jobs.get(job_id)

    def events(self, job_id: str) -> list[dict]:
        return self.jobs.events_after(job_id, -1)

    def wait_for(self, job_id: str, what: Callable[[Job, list[dict]], bool], timeout: float,
                 poll: float = 0.05) -> Job:
        """Poll the job until `what(job, events)` holds; fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.record(job_id)
            events = self.events(job_id)
            if what(job, events):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s; job is {job.status}: {events[-3:]}")
            time.sleep(poll)

    def wait_steps(self, job_id: str, steps: int, timeout: float = 60, poll: float = 0.02) -> Job:
        return self.wait_for(job_id, lambda j, e: steps_done(e) >= steps or j.terminal, timeout, poll)

    def wait_ended(self, job_id: str, timeout: float) -> Job:
        """Wait for a terminal status (bounded: a job left in_progress fails the test)."""
        return self.wait_for(job_id, lambda j, e: j.terminal, timeout, poll=0.2)

    def expire(self, job_id: str, timeout: float = 30) -> None:
        """Move the ended job's retention deadline into the past; wait until the sweep has deleted it."""
        with self.db.write() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(expires_at=time.time() - 1))
        deadline = time.monotonic() + timeout
        while self.http.get(f"/v1/videos/{job_id}").status_code != 404:
            assert time.monotonic() < deadline, "the expired job is still there"
            time.sleep(0.2)

    def run(self, timeout: float = 120, **fields) -> tuple[str, bytes]:
        job_id = self.submit(**fields)
        job = self.wait_ended(job_id, timeout)
        assert job.status == "completed", job.error
        return job_id, self.content(job_id)

    def reference_video(self, pipeline, job_id: str, folder: Path) -> bytes:
        """The job's video made by the in-process `pipeline` from the job's own request and seed."""
        job = self.record(job_id)
        plan = replan(job.request, job.plan["seed"], "tiny")
        with one_thread():  # as the service's replicas and workers run (under one CPU: one thread)
            return pipeline.generate(plan, folder / f"{job_id}.mp4").video_path.read_bytes()

    # -- Ray -----------------------------------------------------------------------------------

    @staticmethod
    def replicas(deployment: str) -> list[tuple[str, ray.actor.ActorHandle]]:
        prefix = PREFIX.format(deployment)
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
            if healthy and all(running.get(name) == n and len(self.replicas(name)) == n
                               for name, n in self.replica_counts.items()):
                try:
                    if self.http.get("/health", timeout=5).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            assert time.monotonic() < deadline, f"service not ready: {running}"
            time.sleep(0.25)

    def runners(self) -> dict[str, bool]:
        """Each live Runner replica's lease holder name -> whether it is draining. Read from the replica's
        own object: Serve routes no call to a replica it is stopping (where the drain runs)."""

        def state(replica) -> tuple[str, bool] | None:  # in the replica's actor (a closure: pickled by value)
            runner = replica._replica_impl._user_callable_wrapper.user_callable
            draining = getattr(runner, "draining", None)  # None until its __init__ has run
            return None if draining is None else (runner.holder, draining.is_set())

        asked = [actor.__ray_call__.remote(state) for _, actor in self.replicas("Runner")]
        ready, _ = ray.wait(asked, num_returns=len(asked), timeout=2)  # not one still starting (no process yet)
        states: dict[str, bool] = {}
        for ref in ready:
            try:
                found = ray.get(ref)
            except RayActorError:  # stopped meanwhile
                continue
            if found is not None:
                states[found[0]] = found[1]
        return states

    def stats(self, deployment: str) -> dict[int, dict]:
        """`stats()` of every replica of `deployment`, by pid (concurrent calls through the handle spread
        over the replicas, as each takes one request at a time)."""
        handle = serve.get_deployment_handle(deployment, app_name="pusa")
        want = len(self.replicas(deployment))
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
        raise AssertionError(f"reached {len(stats)} of {want} {deployment} replicas")

    def dit_steps(self) -> int:
        """DiT steps run so far by the live DiT replicas."""
        return sum(s["steps_run"] for s in self.stats("DiT").values())

    def kill_busy(self, deployment: str) -> str | None:
        """Kill a replica of `deployment` that is serving a request now (None if none was)."""
        for name, actor in self.replicas(deployment):
            try:
                busy = ray.get(actor.get_num_ongoing_requests.remote(), timeout=5)
            except RayError:
                continue
            if busy:
                ray.kill(actor, no_restart=False)
                return name
        return None

    def kill_mid_step(self, job_id: str, deployment: str, stage: str, steps_before: int, kills: int = 3) -> list[str]:
        """Kill a replica of `deployment` while it serves a call of job `job_id`, until the job records a retry
        of `stage` (a step can end between finding its replica busy and the kill: then it tries again, at most
        `kills` times, before step `steps_before` is done). Returns the replicas killed."""
        killed: list[str] = []
        while True:
            name = self.kill_busy(deployment)
            if name:
                killed.append(name)
                try:
                    self.wait_for(job_id, lambda j, e: any(x["type"] == "retry" and x["stage"] == stage for x in e),
                                  timeout=5)
                    return killed
                except AssertionError:
                    pass
            job, events = self.record(job_id), self.events(job_id)
            assert not job.terminal and steps_done(events) < steps_before and len(killed) < kills, \
                f"no {stage} retry after killing {killed}; job {job.status}: {job.error}"
            time.sleep(0.01)

    def kill_all(self, deployment: str) -> None:
        for _, actor in self.replicas(deployment):
            ray.kill(actor, no_restart=False)

    def freeze(self, deployment: str) -> list[int]:
        """SIGSTOP every replica process of `deployment`: calls to it hang. Returns their pids."""
        pids = [ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10)
                for _, actor in self.replicas(deployment)]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        return pids

    @staticmethod
    def thaw(pids: list[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
