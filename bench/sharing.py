"""A batch and the online endpoint sharing A6000 cards, on Ray's fake autoscaling cluster (tiny preset, CPU).

The cap of docs/deploy.md ("Batch next to the online service"): the online DiT autoscales 1..2 replicas,
one `A6000` card each; a batch submitted through `/v1/batches` holds `batch.dit.concurrency` = 1 card
for its DiT pool (its other pools on the head); the autoscaler may add up to 3 one-card A6000 nodes, so
both fit. A closed loop of online clients runs jobs first alone, then while the batch runs. Reported:
online job latency (submit to completed) p50/p95 in each phase and their ratio, the online DiT replicas
running and the A6000 nodes alive during each phase, and the batch's rows done meanwhile. The stated
bound: online p95 with the batch running is at most `--bound` times the p95 alone (exit 1 otherwise).

The fake nodes all run on this machine's cores, so the batch's actors take CPU from the online replicas
here, as a batch's CPU work (decoding rows, MP4 encoding) does on a shared node; `batch.nice` lowers the
batch actors' CPU priority (`--nice 0` shows the batch without it). On real cards the batch's DiT
computes on its own card.

    .venv/bin/python bench/sharing.py [--clients 2] [--steps 8] [--measure-s 60] [--bound 4.0] [--nice 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import ray
from ray import serve
from ray.serve.schema import ServeDeploySchema

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fake_cluster import fake_autoscaling_cluster  # noqa: E402
from serving import free_port, local_config  # noqa: E402

from deployments.launch import deploy  # noqa: E402

A6000_NODE = {"resources": {"CPU": 1, "GPU": 1, "A6000": 1, "object_store_memory": 150 * 1024 * 1024},
              "node_config": {}, "min_workers": 0, "max_workers": 3}
ON_HEAD = {"num_cpus": 0, "resources": {"pusa_head": 1}}
DEPLOYMENTS = {
    "Router": {"ray_actor_options": ON_HEAD},
    "Runner": {"ray_actor_options": ON_HEAD},
    "TextEncoder": {"ray_actor_options": ON_HEAD},
    "VAE": {"ray_actor_options": ON_HEAD},
    "DiT": {"max_ongoing_requests": 1, "graceful_shutdown_timeout_s": 60,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                   "upscale_delay_s": 1, "downscale_delay_s": 600, "metrics_interval_s": 1,
                                   "look_back_period_s": 2},
            "ray_actor_options": {"num_cpus": 0, "num_gpus": 1, "resources": {"A6000": 1}}},
}
HEAD_POOL = {"concurrency": 1, "resources": {"pusa_head": 1}}
BATCH_POOLS = {"conditioning": HEAD_POOL, "text": HEAD_POOL, "decode": HEAD_POOL,
               "dit": {"concurrency": 1, "num_gpus": 1, "resources": {"A6000": 1}}}  # the cap: one card
TERMINAL = ("completed", "failed", "cancelled")


def dit_running() -> int:
    dit = serve.status().applications["pusa"].deployments["DiT"]
    return sum(n for state, n in dit.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING")


def a6000_nodes() -> int:
    return sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("A6000", 0) >= 1)


async def online_load(url: str, clients: int, steps: int, seconds: float, samples: list[tuple[int, int]]) -> list[float]:
    """`clients` loops of one job each (submit, poll to the end) for `seconds`; the completed jobs'
    latencies. Samples (DiT replicas running, A6000 nodes) every second meanwhile."""
    latencies: list[float] = []
    end = time.monotonic() + seconds

    async def client(n: int, http: httpx.AsyncClient) -> None:
        while time.monotonic() < end:
            started = time.monotonic()
            job = (await http.post("/v1/videos", json={"prompt": f"online {n}", "steps": steps})).json()
            while (job := (await http.get(f"/v1/videos/{job['id']}")).json())["status"] not in TERMINAL:
                await asyncio.sleep(0.1)
            if job["status"] == "completed":
                latencies.append(time.monotonic() - started)

    async def sample() -> None:
        while time.monotonic() < end:
            samples.append(await asyncio.to_thread(lambda: (dit_running(), a6000_nodes())))
            await asyncio.sleep(1)

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        await asyncio.gather(sample(), *(client(n, http) for n in range(clients)))
    return latencies


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) >= 2 else values[0]


def summary(latencies: list[float], samples: list[tuple[int, int]]) -> dict:
    return {"jobs": len(latencies), "p50_s": round(statistics.median(latencies), 3), "p95_s": round(p95(latencies), 3),
            "dit_replicas_min": min(s[0] for s in samples), "dit_replicas_max": max(s[0] for s in samples),
            "a6000_nodes_max": max(s[1] for s in samples)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warm-s", type=float, default=45.0)
    parser.add_argument("--measure-s", type=float, default=60.0)
    parser.add_argument("--batch-rows", type=int, default=400)
    parser.add_argument("--bound", type=float, default=4.0)
    parser.add_argument("--nice", type=int, default=10, help="the batch actors' CPU priority (app arg batch.nice)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="pusa-sharing-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = ServeDeploySchema.model_validate(local_config(
        str(folder / "store"), port, deployments=DEPLOYMENTS, args={"batch": {**BATCH_POOLS, "nice": args.nice}},
        runner={"max_running_jobs": args.clients}))
    with fake_autoscaling_cluster(folder, {"a6000": A6000_NODE}, max_workers=3) as gcs_address:
        ray.init(address=gcs_address, namespace="serve", log_to_driver=False)
        try:
            problems = deploy(config, 300)
            assert not problems, problems
            asyncio.run(online_load(url, args.clients, args.steps, args.warm_s, []))  # the DiT scales to 2
            alone_samples: list[tuple[int, int]] = []
            alone = asyncio.run(online_load(url, args.clients, args.steps, args.measure_s, alone_samples))

            lines = "".join(json.dumps({"custom_id": f"row-{i}", "method": "POST", "url": "/v1/videos",
                                        "body": {"prompt": f"batch {i % 7}", "steps": args.steps, "seed": i}}) + "\n"
                            for i in range(args.batch_rows))
            with httpx.Client(base_url=url, timeout=60) as http:
                upload = http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("b.jsonl", lines.encode())}).json()
                batch = http.post("/v1/batches", json={"input_file_id": upload["id"], "endpoint": "/v1/videos",
                                                       "completion_window": "24h"}).json()
                started = time.monotonic()
                while (batch := http.get(f"/v1/batches/{batch['id']}").json())["request_counts"]["completed"] < 1:
                    assert time.monotonic() - started < 300, batch
                    time.sleep(0.5)
                batch_start = (time.monotonic() - started, batch["request_counts"]["completed"])
                shared_samples: list[tuple[int, int]] = []
                shared = asyncio.run(online_load(url, args.clients, args.steps, args.measure_s, shared_samples))
                rows_during = http.get(f"/v1/batches/{batch['id']}").json()["request_counts"]["completed"] - batch_start[1]
                assert http.post(f"/v1/batches/{batch['id']}/cancel").json()["status"] in ("cancelling", "cancelled")
        finally:
            serve.shutdown()
            ray.shutdown()
    result = {"clients": args.clients, "steps": args.steps, "measure_s": args.measure_s, "nice": args.nice,
              "alone": summary(alone, alone_samples), "with_batch": summary(shared, shared_samples),
              "batch_first_row_s": round(batch_start[0], 1), "batch_rows_during": rows_during,
              "batch_rows_per_s": round(rows_during / args.measure_s, 3)}
    result["p95_ratio"] = round(result["with_batch"]["p95_s"] / result["alone"]["p95_s"], 3)
    result["p50_ratio"] = round(result["with_batch"]["p50_s"] / result["alone"]["p50_s"], 3)
    result["bound"] = args.bound
    print(json.dumps(result, indent=1))
    return 0 if result["p95_ratio"] <= args.bound else 1


if __name__ == "__main__":
    sys.exit(main())
