"""Autoscaling end to end, for real, on Ray's fake autoscaling cluster.  SLOW: about 3-4 minutes.

A head without A6000 runs the Router, TextEncoder and VAE; the autoscaler may add up to two `a6000`
worker nodes (`{"CPU": 1, "GPU": 1, "A6000": 1}`, logical GPUs). The DiT asks for one GPU and one
A6000, autoscaling 1..2 replicas with target_ongoing_requests 1. Overlapping jobs over HTTP must
scale the DiT to 2 replicas, make the autoscaler add a second A6000 node, put every DiT replica on an
A6000 node and complete every job; without load the DiT goes back to 1 replica and the idle node is
removed.

The fake cluster (`fake_cluster.py`) runs on this machine; everything it started is stopped at the end.

Set PUSA_SKIP_SLOW=1 to skip it.
"""

from __future__ import annotations

import os
import time

import httpx
import pytest
import ray
from ray import serve
from ray.serve.schema import ServeDeploySchema
from ray.util.state import list_actors

from deployments.launch import deploy
from fake_cluster import fake_autoscaling_cluster as fake_cluster
from serving import free_port, local_config, stop_ray

pytestmark = pytest.mark.skipif(os.environ.get("PUSA_SKIP_SLOW") == "1", reason="PUSA_SKIP_SLOW=1")

DIT_CLASS = "ServeReplica:pusa:DiT"
WORKER_TYPE = {"resources": {"CPU": 1, "GPU": 1, "A6000": 1, "object_store_memory": 150 * 1024 * 1024},
               "node_config": {}, "min_workers": 0, "max_workers": 2}
JOBS_IN_FLIGHT, MAX_JOBS, STEPS = 6, 40, 20
TERMINAL = ("completed", "failed", "cancelled")

ON_HEAD = {"num_cpus": 0, "resources": {"pusa_head": 1}}  # a custom resource only the head has
DEPLOYMENTS = {
    "Router": {"ray_actor_options": ON_HEAD},
    "TextEncoder": {"ray_actor_options": ON_HEAD},
    "VAE": {"ray_actor_options": ON_HEAD},
    "DiT": {
        "max_ongoing_requests": 1,
        "graceful_shutdown_timeout_s": 60,
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                               "upscale_delay_s": 1, "downscale_delay_s": 5,
                               "metrics_interval_s": 1, "look_back_period_s": 2},
        "ray_actor_options": {"num_cpus": 0, "num_gpus": 1, "resources": {"A6000": 1}},
    },
}


@pytest.fixture
def fake_autoscaling_cluster(tmp_path):
    with fake_cluster(tmp_path, {"a6000": WORKER_TYPE}, max_workers=2) as gcs_address:
        yield gcs_address


class Observer:
    """Samples DiT replicas, A6000 nodes and where each DiT replica runs."""

    def __init__(self, address: str) -> None:
        self.address = address  # the state API needs it: other Rays may run on this machine
        self.max_dit_running = 0
        self.max_a6000_nodes = 0
        self.dit_nodes: dict[str, str] = {}  # actor id -> node id
        self.a6000_node_ids: set[str] = set()  # every node that ever offered A6000

    def a6000_nodes(self) -> set[str]:
        alive = set()
        for node in ray.nodes():
            if node["Resources"].get("A6000", 0) >= 1:
                self.a6000_node_ids.add(node["NodeID"])
                if node["Alive"]:
                    alive.add(node["NodeID"])
        return alive

    def dit_running(self) -> int:
        dit = serve.status().applications["pusa"].deployments["DiT"]
        return sum(n for state, n in dit.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING")

    def dit_replicas(self) -> list:
        return list_actors(address=self.address, filters=[("class_name", "=", DIT_CLASS), ("state", "=", "ALIVE")])

    def sample(self) -> tuple[int, int]:
        nodes, running = self.a6000_nodes(), self.dit_running()
        for actor in self.dit_replicas():
            self.dit_nodes[actor.actor_id] = actor.node_id
        self.max_dit_running = max(self.max_dit_running, running)
        self.max_a6000_nodes = max(self.max_a6000_nodes, len(nodes))
        return running, len(nodes)

    def check_placement(self) -> None:
        assert self.dit_nodes, "no DiT replica seen"
        stray = {a: n for a, n in self.dit_nodes.items() if n not in self.a6000_node_ids}
        assert not stray, f"DiT replicas off A6000 nodes: {stray} (A6000 nodes: {self.a6000_node_ids})"


def test_dit_and_a6000_nodes_scale_up_and_back_down(fake_autoscaling_cluster, tmp_path):
    t0 = time.monotonic()
    timings = {}
    port = free_port()
    config = ServeDeploySchema.model_validate(
        local_config(str(tmp_path / "store"), port, deployments=DEPLOYMENTS))
    stop_ray()  # the local Ray an earlier module kept: this test's driver joins the fake cluster
    ray.init(address=fake_autoscaling_cluster, namespace="serve")
    seen = Observer(fake_autoscaling_cluster)
    try:
        assert seen.a6000_nodes() == set(), "the head must not offer A6000"
        # The first DiT replica (min_replicas 1) already needs the autoscaler to add an A6000 node.
        problems = deploy(config, 300)
        assert not problems, problems
        timings["deployed"] = time.monotonic() - t0
        running, nodes = seen.sample()
        assert (running, nodes) == (1, 1)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the proxy never routed /health"
            time.sleep(0.5)

        # Load: overlapping jobs keep a DiT step waiting for each running job (the runner runs 4 at a
        # time). How long a job takes depends on how busy this machine is, so jobs keep coming - up
        # to a bound - until the scale-up has been seen; then every job must complete.
        jobs: dict[str, str] = {}  # id -> last status
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            seen.sample()
            for job, state in jobs.items():
                if state not in TERMINAL:
                    jobs[job] = httpx.get(f"{url}/v1/videos/{job}", timeout=10).json()["status"]
            active = sum(state not in TERMINAL for state in jobs.values())
            scaled_up = seen.max_dit_running == 2 and seen.max_a6000_nodes == 2
            if scaled_up:
                timings.setdefault("scaled_up", time.monotonic() - t0)
                if not active:
                    break
            while not scaled_up and active < JOBS_IN_FLIGHT and len(jobs) < MAX_JOBS:
                r = httpx.post(f"{url}/v1/videos", timeout=30,
                               json={"prompt": f"a cat {len(jobs)}", "steps": STEPS, "seed": len(jobs)})
                assert r.status_code == 200, r.text
                jobs[r.json()["id"]] = r.json()["status"]
                active += 1
            time.sleep(1)
        timings["jobs_done"] = time.monotonic() - t0
        print(f"{len(jobs)} jobs; max DiT replicas {seen.max_dit_running}, max A6000 nodes {seen.max_a6000_nodes}")
        assert seen.max_dit_running == 2, "DiT never scaled to 2 replicas under load"
        assert seen.max_a6000_nodes == 2, "the autoscaler never added a second A6000 node"
        assert set(jobs.values()) == {"completed"}, jobs
        seen.check_placement()

        # No load: DiT back to min_replicas, and the idle A6000 node is removed.
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            running, nodes = seen.sample()
            if (running, nodes) == (1, 1):
                break
            time.sleep(1)
        timings["scaled_down"] = time.monotonic() - t0
        assert (running, nodes) == (1, 1), f"{running} DiT replicas on {nodes} A6000 nodes after the load"
        seen.check_placement()
        (last,) = seen.dit_replicas()
        assert last.node_id in seen.a6000_nodes()
        assert len(seen.dit_nodes) >= 2
        print("autoscaling timings (s since start):", {k: round(v, 1) for k, v in timings.items()})
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
