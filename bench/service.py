"""What the Serve deployment costs over the in-process pipeline, on the CPU with the `tiny` preset.

One run starts the local profile (``serve_config.local.yaml``) on a fresh local Ray and measures:

1. **Overhead per denoising step.** The same request (t2v, guidance 5, so two DiT passes a step) at
   64x64x17 and 256x256x33:

   - ``inprocess``: `PusaPipeline.from_preset("tiny", device="cpu")`, each ``pipe.dit.step(...)``
     timed, with torch at the DiT replica's thread count (Ray gives a ``num_cpus: 0`` replica
     ``OMP_NUM_THREADS=1``), so the difference is the distribution, not the thread count;
   - ``service``: a job over HTTP (``POST /v1/videos``, then its SSE events); a step's time is the
     difference of consecutive ``step`` events' ``elapsed_s`` (the first step, which waits for the
     encoders, is dropped). It covers the DiT handle call with the latents' round trip, the step's
     checkpoint in the store and the runner's one fenced write of the step to the job database;
   - ``worker``: the in-process loop inside a Ray actor placed like the DiT replicas, to tell the
     worker's environment (threads, scheduling beside the other replicas) from the distribution;
   - ``handle``: the same steps sent from this process straight to the DiT deployment through a
     `DeploymentHandle` (no router, no runner), which splits the service's overhead into handle + latent hop and
     the runner's bookkeeping (the text embeddings go as one stored object, as the runner puts the
     TextEncoder's result in the object store once per job).

   The runs of the three variants take turns, so drifting background load hits each alike.
   Overhead = median(service) - median(inprocess), over the steps of every run (first step of each
   run dropped in every variant). The issue's goal is at most 50 ms a step.

2. **Where the overhead goes.** A DiT handle call that does no work (``DiT.stats``), and the latent hop
   against size: each step's latents go to a DiT replica and come back to the runner
   (`deployments/job_run.py`), so an echo actor (``num_cpus: 0``, like the replicas) round-trips arrays
   of the latent shapes of 64x64x17, 256x256x33, 512x512x81 and 832x480x81 (the real model's 480p
   clip); the hop is the round trip less the smallest one's. (The job database's share of a step:
   `bench/control_plane.py`.)

3. **Load.** 1, 4 and 16 t2v jobs (4 steps, 64x64x17) submitted at once, each waited for on its SSE
   stream. Latency = the job record's ``completed_at`` - the client's clock just before its POST (same
   machine, same clock); throughput = jobs / (last completion - first submit). The DiT deployment
   autoscales as the local profile says (1-2 replicas) unless ``--dit-replicas`` fixes it.

The job database is a SQLite file beside the store unless ``--database`` names another (e.g. a
PostgreSQL URL).

Usage::

    .venv/bin/python bench/service.py --out service_cpu.json

Prints a markdown table and writes every sample as JSON. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray import serve  # noqa: E402
from serving import default_database, local_config, running_service  # noqa: E402  (tests/serving.py)

from deployments.dit import alpha_model_id  # noqa: E402
from pusa_jobs.db import Database  # noqa: E402
from pusa_jobs.job_store import JobStore  # noqa: E402
from pusa_model.operations import StepInput  # noqa: E402
from pusa_model.pipeline import PusaPipeline  # noqa: E402
from pusa_model.request import parse_request, plan_request  # noqa: E402
from pusa_model.sampler import initial_latents, initial_noise  # noqa: E402

APP = "pusa"
PROMPT = "A cat walks on the grass, realistic"
OVERHEAD_SIZES = ((64, 64, 17), (256, 256, 33))  # (width, height, frames)
HOP_SIZES = ((64, 64, 17), (256, 256, 33), (512, 512, 81), (832, 480, 81))
GOAL_MS = 50.0


# -- helpers ---------------------------------------------------------------------------------------


def request_body(size: tuple[int, int, int], steps: int, seed: int, guidance: float = 5.0) -> dict:
    width, height, frames = size
    return {"prompt": PROMPT, "width": width, "height": height, "frames": frames, "steps": steps,
            "guidance": guidance, "seed": seed}


def latent_shape(size: tuple[int, int, int]) -> tuple[int, ...]:
    width, height, frames = size
    return (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)


def latent_mb(size: tuple[int, int, int]) -> float:
    return float(np.prod(latent_shape(size))) * 4 / 1e6  # float32


def label(size: tuple[int, int, int]) -> str:
    return "x".join(map(str, size))


def ms(values: list[float]) -> list[float]:
    return [round(v * 1000, 3) for v in values]


def summary(samples_s: list[float], per_run_s: list[list[float]] | None = None) -> dict:
    """Median and quartiles (ms) over all samples, and each run's median."""
    q = statistics.quantiles(samples_s, n=4) if len(samples_s) > 1 else [samples_s[0]] * 3
    out = {"median_ms": round(statistics.median(samples_s) * 1000, 2), "p25_ms": round(q[0] * 1000, 2),
           "p75_ms": round(q[2] * 1000, 2), "n": len(samples_s)}
    if per_run_s:
        medians = [statistics.median(r) * 1000 for r in per_run_s if r]
        out["run_medians_ms"] = [round(m, 2) for m in medians]
    return out


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default)."""
    return float(np.percentile(values, p))


def run_job(client: httpx.Client, url: str, body: dict) -> tuple[float, str, list[dict]]:
    """POST a job and follow its SSE stream to the end: (submit time, job id, events)."""
    submitted = time.time()
    response = client.post(f"{url}/v1/videos", json=body, timeout=60)
    response.raise_for_status()
    job_id = response.json()["id"]
    events = []
    with client.stream("GET", f"{url}/v1/videos/{job_id}/events", timeout=httpx.Timeout(600, connect=30)) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    if not events or events[-1]["type"] != "completed":
        raise RuntimeError(f"job {job_id} did not complete: {events[-1:]}")
    return submitted, job_id, events


def dit_replicas() -> int:
    try:
        states = serve.status().applications[APP].deployments["DiT"].replica_states
        return int(states.get("RUNNING", 0))
    except Exception:  # noqa: BLE001 - a status hiccup must not stop a measurement
        return -1


# -- 1. overhead per step --------------------------------------------------------------------------


def inprocess_runs(pipe: PusaPipeline, size, steps: int, runs: int, threads: int) -> list[list[float]]:
    """Seconds of each `pipe.dit.step` after the first, for `runs` full step loops of the request."""
    plan = plan_request(parse_request(request_body(size, steps, seed=1)), pipe.preset)
    req = plan.request
    prompt, negative = pipe.text.encode(req.prompt, req.negative_prompt)
    start = initial_latents(initial_noise(plan.latent_shape, plan.seed), torch.zeros(plan.latent_shape),
                            plan.multipliers)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pipe.dit.step(start, 0, plan.sigmas, plan.multipliers, prompt, negative, req.guidance,
                      lora_alpha=req.lora_alpha)  # warm-up (and the LoRA fuse)
        out = []
        for _ in range(runs):
            latents, times = start, []
            for k in range(steps):
                t0 = time.perf_counter()
                latents = pipe.dit.step(latents, k, plan.sigmas, plan.multipliers, prompt, negative, req.guidance,
                                        lora_alpha=req.lora_alpha)
                if k > 0:
                    times.append(time.perf_counter() - t0)
            out.append(times)
        return out
    finally:
        torch.set_num_threads(previous)


def handle_runs(pipe: PusaPipeline, size, steps: int, runs: int) -> list[list[float]]:
    """Seconds of each DiT step sent from here straight to the DiT deployment (no runner)."""
    plan = plan_request(parse_request(request_body(size, steps, seed=1)), pipe.preset)
    req = plan.request
    prompt, negative = pipe.text.encode(req.prompt, req.negative_prompt)
    # One object for the whole job, as the runner puts the text embeddings in the object store once.
    text = ray.put((prompt.numpy(), negative.numpy()))
    dit = serve.get_deployment_handle("DiT", APP).options(multiplexed_model_id=alpha_model_id(req.lora_alpha))
    out = []
    for _ in range(runs):
        latents, times = None, []
        for k in range(steps):
            t0 = time.perf_counter()
            latents = dit.step.remote(StepInput.of(plan, k, latents, None, text)).result()
            if k > 0:
                times.append(time.perf_counter() - t0)
        out.append(times)
    return out


def noop_handle_times(calls: int) -> list[float]:
    """Seconds of a DiT handle call that does no work (`DiT.stats`), routed like a step."""
    dit = serve.get_deployment_handle("DiT", APP).options(multiplexed_model_id=alpha_model_id(1.4))
    for _ in range(3):
        dit.stats.remote().result()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        dit.stats.remote().result()
        times.append(time.perf_counter() - t0)
    return times


def service_runs(url: str, size, steps: int, runs: int, seed: int = 1) -> list[list[float]]:
    """Seconds between consecutive `step` events (from step 2 on) of `runs` jobs run one at a time."""
    out = []
    with httpx.Client() as client:
        for i in range(runs):
            _, _, events = run_job(client, url, request_body(size, steps, seed=seed + i))
            elapsed = [e["elapsed_s"] for e in events if e["type"] == "step"]
            out.append([b - a for a, b in zip(elapsed, elapsed[1:])])
    return out


# -- 2. latent hop ---------------------------------------------------------------------------------


@ray.remote(num_cpus=0)
class Echo:
    """Returns what it is given; created like the replicas (``num_cpus: 0``)."""

    def threads(self) -> dict:
        import torch as t  # the replica's view: Ray sets OMP_NUM_THREADS for num_cpus 0 workers

        return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch_threads": t.get_num_threads()}

    def echo(self, x):
        return x


@ray.remote(num_cpus=0)
class InWorker:
    """The in-process pipeline inside a Ray worker placed like the DiT replicas (``num_cpus: 0``)."""

    def __init__(self) -> None:
        self.pipe = PusaPipeline.from_preset("tiny", device="cpu")

    def runs(self, size, steps: int) -> list[list[float]]:
        return inprocess_runs(self.pipe, size, steps, 1, torch.get_num_threads())


def hop_times(echo, calls: int) -> list[dict]:
    """Round trips of each latent size to `echo`, the sizes taking turns (so background load hits each alike)."""
    arrays = [np.random.default_rng(0).standard_normal(latent_shape(size), dtype=np.float32) for size in HOP_SIZES]
    times: list[list[float]] = [[] for _ in HOP_SIZES]
    for i in range(calls + 3):
        for x, out in zip(arrays, times):
            t0 = time.perf_counter()
            ray.get(echo.echo.remote(x))
            if i >= 3:  # the first rounds warm up
                out.append(time.perf_counter() - t0)
    rows = [{"size": label(size), "latent_shape": list(latent_shape(size)), "latent_mb": round(latent_mb(size), 3),
             "round_trip": summary(t), "samples_ms": ms(t)} for size, t in zip(HOP_SIZES, times)]
    base = rows[0]["round_trip"]["median_ms"]
    for row in rows:
        row["hop_over_smallest_ms"] = round(row["round_trip"]["median_ms"] - base, 2)
    return rows


# -- 3. load ---------------------------------------------------------------------------------------


def load_level(url: str, jobs: JobStore, concurrency: int, steps: int) -> dict:
    """Submit `concurrency` jobs at once; wait for all; latency and throughput."""
    replicas = [dit_replicas()]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(1.0):
            replicas.append(dit_replicas())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    size = OVERHEAD_SIZES[0]
    with httpx.Client(limits=httpx.Limits(max_connections=2 * concurrency + 4)) as client, \
            ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: run_job(client, url, request_body(size, steps, seed=100 + i)),
                                range(concurrency)))
    stop.set()
    watcher.join()
    latencies, completions, queued, running, denoise = [], [], [], [], []
    for submitted, job_id, events in results:
        record = jobs.get(job_id)
        latencies.append(record.completed_at - submitted)
        completions.append(record.completed_at)
        queued.append(record.started_at - submitted)  # POST + time until a runner claimed it
        running.append(record.completed_at - record.started_at)  # encode, steps, decode, MP4, store
        denoise.append([e["elapsed_s"] for e in events if e["type"] == "step"][-1])  # encoders' wait + steps
    first_submit = min(s for s, _, _ in results)
    span = max(completions) - first_submit
    return {"latencies_s": [round(v, 3) for v in latencies], "queued_s": [round(v, 3) for v in queued],
            "running_s": [round(v, 3) for v in running], "encode_and_steps_s": denoise, "span_s": round(span, 3),
            "jobs_per_min": round(concurrency / span * 60, 2), "dit_replicas_max": max(replicas)}


# -- report ----------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"{env['machine']}, ray {env['ray']}, torch {env['torch']}; 1-minute load average "
             f"{env['loadavg_1m_start']} at the start, {env['loadavg_1m_end']} at the end; {result['wall_s']:.0f} s.", "",
             "Overhead per denoising step (t2v, guidance 5; median over steps 2..N of every run, ms):", "",
             "| size | latent | in-process | service | **overhead** | goal ≤ 50 ms | in-process in a Ray worker "
             "| DiT handle from the driver | service - handle |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["overhead"]:
        lines.append(
            f"| {row['size']}, {row['steps']} steps | {row['latent_mb']:.2f} MB | {row['inprocess']['median_ms']:.1f} "
            f"| {row['service']['median_ms']:.1f} | **{row['overhead_ms']:.1f}** "
            f"| {'met' if row['overhead_ms'] <= GOAL_MS else 'NOT met'} | {row['worker']['median_ms']:.1f} "
            f"| {row['handle']['median_ms']:.1f} | {row['service_over_handle_ms']:.1f} |")
    lines += ["", f"Spread: medians of each of the {result['config']['runs']} runs (ms), and service - in-process "
              "per run (the runs of the variants take turns):", ""]
    for row in result["overhead"]:
        pairs = row["overhead_run_pairs_ms"]
        lines.append(f"- {row['size']}: in-process {row['inprocess']['run_medians_ms']}, service "
                     f"{row['service']['run_medians_ms']}, in a worker {row['worker']['run_medians_ms']}, handle "
                     f"{row['handle']['run_medians_ms']}; overhead per run "
                     f"{min(pairs):.1f}–{max(pairs):.1f} (median {statistics.median(pairs):.1f})")
        if "inprocess_default_threads" in row:
            d = row["inprocess_default_threads"]
            lines.append(f"  (in-process with torch's default {d['threads']} threads: median {d['median_ms']:.1f} ms, "
                         f"p75 {d['p75_ms']:.1f})")
    if result.get("noop_handle"):
        lines += ["", f"A DiT handle call that does no work (`DiT.stats`): median {result['noop_handle']['median_ms']:.1f} ms "
                  f"(p25 {result['noop_handle']['p25_ms']:.1f}, p75 {result['noop_handle']['p75_ms']:.1f})."]
    if not result["hop"]:
        return "\n".join(lines)
    lines += ["", "Latent round trip to a `num_cpus: 0` actor (median ms over calls):", "",
              "| size | latent shape | MB | round trip | hop over smallest |", "|---|---|---|---|---|"]
    for row in result["hop"]:
        lines.append(f"| {row['size']} | {'x'.join(map(str, row['latent_shape']))} | {row['latent_mb']:.2f} "
                     f"| {row['round_trip']['median_ms']:.2f} | {row['hop_over_smallest_ms']:.2f} |")
    if not result["load"]:
        return "\n".join(lines)
    lines += ["", f"Load (t2v 64x64x17, {result['config']['load_steps']} steps, guidance 5; DiT "
              f"{result['config']['dit_replicas']}; {result['config']['load_repeats']} rounds per level):", "",
              "| concurrent jobs | p50 latency s | p95 latency s | jobs/min (median, range) | DiT replicas seen "
              "| median s queued / running (of which encode + steps) |",
              "|---|---|---|---|---|---|"]
    for row in result["load"]:
        jpm, parts = row["jobs_per_min"], row["median_parts_s"]
        lines.append(f"| {row['concurrency']} | {row['p50_s']:.2f} | {row['p95_s']:.2f} "
                     f"| {jpm['median']:.1f} ({jpm['min']:.1f}–{jpm['max']:.1f}) | {row['dit_replicas_max']} "
                     f"| {parts['queued_s']:.2f} / {parts['running_s']:.2f} ({parts['encode_and_steps_s']:.2f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="denoising steps of the overhead request")
    parser.add_argument("--large-steps", type=int, default=10, help="denoising steps at 256x256x33")
    parser.add_argument("--runs", type=int, default=7, help="runs of each overhead variant per size")
    parser.add_argument("--hop-calls", type=int, default=30, help="echo round trips per latent size")
    parser.add_argument("--load-steps", type=int, default=4, help="steps of each load job")
    parser.add_argument("--load-levels", default="1,4,16", help="concurrent jobs per level")
    parser.add_argument("--load-repeats", type=int, default=3, help="rounds of each load level")
    parser.add_argument("--dit-replicas", type=int, help="fix the DiT replicas (default: the profile's autoscaling)")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: overhead, hop, load")
    parser.add_argument("--database", help="job database URL (default: a SQLite file beside the store)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    started = time.monotonic()

    deployments = None
    if args.dit_replicas:
        deployments = {"DiT": {"num_replicas": args.dit_replicas, "autoscaling_config": None}}
    profile = local_config(store="-", port=0)["applications"][0]
    dit_cfg = next(d for d in profile["deployments"] if d["name"] == "DiT")
    scaling = dit_cfg.get("autoscaling_config") or {}
    dit_desc = (f"fixed at {args.dit_replicas} replica(s)" if args.dit_replicas else
                f"autoscaling {scaling.get('min_replicas')}-{scaling.get('max_replicas')} replicas "
                f"(target_ongoing_requests {scaling.get('target_ongoing_requests')})")
    result: dict = {
        "environment": {"machine": f"{os.cpu_count()}-core CPU, no GPU", "cpu": platform.processor() or platform.machine(),
                        "python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
                        "driver_torch_threads": torch.get_num_threads(),
                        "loadavg_1m_start": round(os.getloadavg()[0], 2)},
        "config": {"steps": args.steps, "large_steps": args.large_steps, "runs": args.runs, "load_steps": args.load_steps,
                   "load_repeats": args.load_repeats, "dit_replicas": dit_desc, "guidance": 5.0,
                   "runner": profile["args"].get("runner")},
        "overhead": [], "noop_handle": None, "hop": [], "load": [],
    }
    pipe = PusaPipeline.from_preset("tiny", device="cpu")
    with tempfile.TemporaryDirectory(prefix="pusa-bench-") as tmp:
        store = str(Path(tmp) / "store")
        database = args.database or default_database(store)
        result["config"]["database"] = Database(database).dialect
        jobs = JobStore(Database(database))
        with running_service(store, deployments=deployments, start_timeout_s=240, database=database) as url:
            print(f"service up at {url} after {time.monotonic() - started:.0f} s", flush=True)
            echo = Echo.remote()
            threads = ray.get(echo.threads.remote())
            result["environment"]["replica_threads"] = threads
            replica_threads = int(threads["torch_threads"])
            worker = InWorker.remote()
            with httpx.Client() as client:  # warm-up: first job loads lazily, fuses the LoRA
                for size in OVERHEAD_SIZES:
                    run_job(client, url, request_body(size, 2, seed=0))
            print(f"warm after {time.monotonic() - started:.0f} s", flush=True)

            if "overhead" not in skip:
                for size, steps in zip(OVERHEAD_SIZES, (args.steps, args.large_steps)):
                    runs: dict[str, list[list[float]]] = {"inprocess": [], "worker": [], "service": [], "handle": []}
                    for i in range(args.runs):  # interleaved, so drifting background load hits each alike
                        runs["inprocess"] += inprocess_runs(pipe, size, steps, 1, replica_threads)
                        runs["worker"] += ray.get(worker.runs.remote(size, steps))
                        runs["service"] += service_runs(url, size, steps, 1, seed=1 + i)
                        runs["handle"] += handle_runs(pipe, size, steps, 1)
                    row = {"size": label(size), "steps": steps, "latent_shape": list(latent_shape(size)),
                           "latent_mb": round(latent_mb(size), 3), "inprocess_threads": replica_threads,
                           **{k: summary([t for r in v for t in r], v) for k, v in runs.items()}}
                    if size == OVERHEAD_SIZES[0]:  # torch's default threads in this process, for contrast
                        row["inprocess_default_threads"] = {
                            "threads": torch.get_num_threads(),
                            **summary(inprocess_runs(pipe, size, steps, 1, torch.get_num_threads())[0])}
                    row["overhead_ms"] = round(row["service"]["median_ms"] - row["inprocess"]["median_ms"], 2)
                    paired = [s - i for s, i in zip(row["service"]["run_medians_ms"], row["inprocess"]["run_medians_ms"])]
                    row["overhead_run_pairs_ms"] = [round(v, 2) for v in paired]
                    row["worker_over_inprocess_ms"] = round(row["worker"]["median_ms"] - row["inprocess"]["median_ms"], 2)
                    row["handle_over_worker_ms"] = round(row["handle"]["median_ms"] - row["worker"]["median_ms"], 2)
                    row["handle_over_inprocess_ms"] = round(row["handle"]["median_ms"] - row["inprocess"]["median_ms"], 2)
                    row["service_over_handle_ms"] = round(row["service"]["median_ms"] - row["handle"]["median_ms"], 2)
                    row["samples_ms"] = {k: [ms(r) for r in v] for k, v in runs.items()}
                    result["overhead"].append(row)
                    print(f"overhead {row['size']}: in-process {row['inprocess']['median_ms']} ms, service "
                          f"{row['service']['median_ms']} ms, handle {row['handle']['median_ms']} ms "
                          f"({time.monotonic() - started:.0f} s)", flush=True)

            if "hop" not in skip:
                noop = noop_handle_times(args.hop_calls)
                result["noop_handle"] = {**summary(noop), "samples_ms": ms(noop)}
                result["hop"] = hop_times(echo, args.hop_calls)
                print(f"hop done ({time.monotonic() - started:.0f} s)", flush=True)

            if "load" not in skip:
                for concurrency in (int(c) for c in args.load_levels.split(",")):
                    rounds = [load_level(url, jobs, concurrency, args.load_steps) for _ in range(args.load_repeats)]
                    latencies = [v for r in rounds for v in r["latencies_s"]]
                    parts = {k: round(statistics.median(v for r in rounds for v in r[k]), 3)
                             for k in ("queued_s", "running_s", "encode_and_steps_s")}
                    jpm = [r["jobs_per_min"] for r in rounds]
                    result["load"].append({
                        "concurrency": concurrency, "p50_s": round(percentile(latencies, 50), 3),
                        "p95_s": round(percentile(latencies, 95), 3), "jobs": len(latencies), "median_parts_s": parts,
                        "jobs_per_min": {"median": statistics.median(jpm), "min": min(jpm), "max": max(jpm),
                                         "rounds": jpm},
                        "dit_replicas_max": max(r["dit_replicas_max"] for r in rounds), "rounds": rounds})
                    print(f"load {concurrency}: p50 {result['load'][-1]['p50_s']} s, jobs/min {jpm} "
                          f"({time.monotonic() - started:.0f} s)", flush=True)
    result["wall_s"] = round(time.monotonic() - started, 1)
    result["environment"]["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    print()
    print(markdown(result))
    print(f"\n(whole run: {result['wall_s']} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
