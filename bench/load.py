"""Load and soak on loopback: the local profile (tiny preset, CPU) offered twice the load it can serve.

    python bench/load.py --seconds 180 --out load.json

Starts `pusa-serve serve_config.local.yaml` in a scratch folder, measures its capacity for one request
shape (jobs per second with every runner slot busy), then submits at twice that rate, open loop, for
`--seconds`. Checks: no 5xx, every refusal a 429 with ``Retry-After``, every accepted job completes.
Reports the router's resident memory over the run, and p50/p95 of the submission's HTTP latency and of
an accepted job's time to completion.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from local_service import URL, router_process, start_service, stop_service

REQUEST = {"prompt": "a cat walks on the grass", "steps": 4}


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values or [float("nan")])[0]


async def wait_done(client: httpx.AsyncClient, video_id: str) -> dict:
    while True:
        job = (await client.get(f"/v1/videos/{video_id}")).json()
        if job["status"] not in ("queued", "in_progress"):
            return job
        await asyncio.sleep(0.5)


async def capacity(client: httpx.AsyncClient, jobs: int) -> float:
    """Jobs per second with `jobs` submitted at once (every runner slot busy, a queue behind them)."""
    started = time.monotonic()
    ids = [(await client.post("/v1/videos", json={**REQUEST, "seed": i})).json()["id"] for i in range(jobs)]
    done = await asyncio.gather(*(wait_done(client, i) for i in ids))
    assert all(job["status"] == "completed" for job in done), done
    return jobs / (time.monotonic() - started)


async def offer(client: httpx.AsyncClient, rate: float, seconds: float, router: psutil.Process) -> dict:
    """Submit at `rate` per second for `seconds`; wait for every accepted job; collect what happened."""
    accepted, refused, statuses, submit_s, rss = [], 0, {}, [], []
    no_retry_after = 0
    tasks = []

    async def one(i: int) -> None:
        nonlocal refused, no_retry_after
        t0 = time.monotonic()
        r = await client.post("/v1/videos", json={**REQUEST, "seed": 1000 + i})
        submit_s.append(time.monotonic() - t0)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if r.status_code == 200:
            job = await wait_done(client, r.json()["id"])
            accepted.append((job["status"], time.monotonic() - t0))
        elif r.status_code == 429:
            refused += 1
            no_retry_after += "retry-after" not in r.headers

    started = time.monotonic()
    i = 0
    while (now := time.monotonic()) - started < seconds:
        if now - started >= i / rate:
            tasks.append(asyncio.create_task(one(i)))
            i += 1
        if not rss or now - rss[-1][0] - started >= 5:
            rss.append((now - started, router.memory_info().rss))
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    rss.append((time.monotonic() - started, router.memory_info().rss))
    latencies = [t for status, t in accepted if status == "completed"]
    return {
        "offered": i, "statuses": statuses, "refused_429": refused, "refused_without_retry_after": no_retry_after,
        "accepted": len(accepted), "completed": len(latencies),
        "submit_p50_ms": round(percentile(submit_s, 50) * 1000, 1),
        "submit_p95_ms": round(percentile(submit_s, 95) * 1000, 1),
        "job_p50_s": round(percentile(latencies, 50), 2), "job_p95_s": round(percentile(latencies, 95), 2),
        "router_rss_mib": [round(r / 2**20, 1) for _, r in rss],
    }


async def run(seconds: float) -> dict:
    async with httpx.AsyncClient(base_url=URL, timeout=60, limits=httpx.Limits(max_connections=200)) as client:
        router = router_process()
        measured = await capacity(client, jobs=12)
        result = await offer(client, 2 * measured, seconds, router)
    return {"request": REQUEST, "capacity_jobs_per_s": round(measured, 3),
            "offered_jobs_per_s": round(2 * measured, 3), "seconds": seconds, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="pusa-load-"))
    service = start_service(folder)
    try:
        result = asyncio.run(run(args.seconds))
    finally:
        stop_service(service)
        shutil.rmtree(folder, ignore_errors=True)
    rss = result["router_rss_mib"]
    result["router_rss_growth_after_first_minute_mib"] = round(rss[-1] - rss[min(12, len(rss) - 1)], 1)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    ok = (set(result["statuses"]) <= {200, 429} and result["refused_without_retry_after"] == 0
          and result["completed"] == result["accepted"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
