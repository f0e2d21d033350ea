"""Batch against online on the CPU (tiny preset), in one run.

    python bench/batch.py --rows 64 --memory-rows 1000 --out batch.json

1. The same `--rows` requests through the online API (`pusa-serve serve_config.local.yaml`, already
   running, submitted as fast as it admits them, every 429 retried after its `Retry-After`) and through
   `pusa batch` on a local Ray: wall time from the first submission to the last video (the batch's
   includes starting its actors), the throughput ratio, and the batch's pace once its actors are up.
2. Time per denoising step: the batch DiT actor's (its rows' denoise time / steps) against the
   in-process stage's `DiTStage.run` at the same size, in this process.
3. Peak memory of the driver (resident) and of the object store while `--memory-rows` rows of a smaller
   request stream through the batch pipeline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import ray
from local_service import URL, start_service, stop_service
from ray._private.internal_api import memory_summary

from pusa_batch.run import BatchSettings, run_batch
from pusa_model.engine import encode_conditioning
from pusa_model.operations import StepInput
from pusa_model.pipeline import PusaPipeline
from pusa_model.request import parse_request, plan_request

REQUEST = {"prompt": "a cat walks on the grass", "steps": 8}
SMALL = {"prompt": "a cat", "steps": 1, "frames": 1}


def manifest(folder: Path, rows: int, request: dict) -> str:
    path = folder / f"manifest-{rows}.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"r{i:05d}", "seed": i, "prompt": f"{request['prompt']} {i % 8}",
                                        **{k: v for k, v in request.items() if k != "prompt"}}) + "\n"
                            for i in range(rows)))
    return str(path)


async def online(rows: int) -> float:
    """Seconds for `rows` jobs through the HTTP API, from the first submission to the last completion."""
    async with httpx.AsyncClient(base_url=URL, timeout=60) as client:
        started = time.monotonic()
        ids = []
        for i in range(rows):
            body = {**REQUEST, "prompt": f"{REQUEST['prompt']} {i % 8}", "seed": i}
            while (r := await client.post("/v1/videos", json=body)).status_code == 429:
                await asyncio.sleep(min(float(r.headers["retry-after"]), 1.0))
            ids.append(r.json()["id"])
        for video_id in ids:
            while (job := (await client.get(f"/v1/videos/{video_id}")).json())["status"] in ("queued", "in_progress"):
                await asyncio.sleep(0.2)
            assert job["status"] == "completed", job
        return time.monotonic() - started


def in_process_step_s(rounds: int = 3) -> float:
    """Median seconds of one `DiTStage.run` (the DiT actor's call) at REQUEST's size, in this process, over
    `rounds` runs of every step after one warm-up step."""
    pipe = PusaPipeline.from_preset("tiny", device="cpu")
    plan = plan_request(parse_request({**REQUEST, "seed": 1}), pipe.preset)
    prompt, negative = pipe.text.encode(plan.request.prompt, plan.request.negative_prompt)
    text = (prompt.numpy(), negative.numpy())
    clean = encode_conditioning(pipe.vae, plan).numpy()
    times = []
    for _ in range(rounds):
        latents = None
        for k in range(plan.request.steps):
            t0 = time.perf_counter()
            latents = pipe.dit.run(StepInput.of(plan, k, latents, clean, text))
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def plasma_mib() -> float:
    text = memory_summary(stats_only=True)
    for line in text.splitlines():
        if "Plasma memory usage" in line:
            return float(line.split("Plasma memory usage")[1].split("MiB")[0])
    return 0.0


def batch(path: str, output: str, records: list) -> tuple[float, dict, dict]:
    """Seconds for a batch, its summary, and the driver's and the object store's peak memory meanwhile."""
    peaks = {"driver_rss_mib": 0.0, "object_store_mib": 0.0}
    done = threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not done.is_set():
            peaks["driver_rss_mib"] = max(peaks["driver_rss_mib"], me.memory_info().rss / 2**20)
            peaks["object_store_mib"] = max(peaks["object_store_mib"], plasma_mib())
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    summary = run_batch(path, output, BatchSettings(), progress=False,
                        on_record=lambda record: records.append({**record, "at": time.monotonic()}))
    seconds = time.monotonic() - started
    done.set()
    sampler.join()
    return seconds, summary, {k: round(v, 1) for k, v in peaks.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--memory-rows", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="pusa-batch-bench-"))
    result: dict = {"request": REQUEST, "rows": args.rows}
    try:
        service = start_service(folder)
        try:
            result["online_s"] = round(asyncio.run(online(args.rows)), 2)
        finally:
            stop_service(service)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        records: list = []
        seconds, summary, _ = batch(manifest(folder, args.rows, REQUEST), str(folder / "out"), records)
        assert summary["completed_total"] == args.rows, summary
        result["batch_s"] = round(seconds, 2)
        result["batch_over_online_throughput"] = round(result["online_s"] / seconds, 3)
        # once every actor is up: the pace between the first row out and the last
        first, last = records[0]["at"], records[-1]["at"]
        result["batch_steady_rows_per_s"] = round((len(records) - 1) / (last - first), 3)
        result["online_rows_per_s"] = round(args.rows / result["online_s"], 3)
        steps = REQUEST["steps"]
        result["batch_step_ms"] = round(statistics.median(r["timings_s"]["denoise"] for r in records) / steps * 1000, 2)
        if args.memory_rows:
            rss_before = psutil.Process().memory_info().rss / 2**20
            seconds, summary, peaks = batch(manifest(folder, args.memory_rows, SMALL), str(folder / "out-mem"), [])
            assert summary["completed_total"] == args.memory_rows, summary
            result["memory"] = {"rows": args.memory_rows, "request": SMALL, "seconds": round(seconds, 1),
                                "driver_rss_before_mib": round(rss_before, 1), **peaks}
        result["in_process_step_ms"] = round(in_process_step_s() * 1000, 2)  # last: it loads the models here
        result["step_added_ms"] = round(result["batch_step_ms"] - result["in_process_step_ms"], 2)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
