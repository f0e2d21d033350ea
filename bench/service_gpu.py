"""The Serve application on one GPU against the in-process pipeline, with 14B-size random weights.

Phases (``--phases``, run in the order given, the checkpoint first; each one's results are written to ``--out``
as soon as it ends, and a phase that fails is recorded and the next one still runs):

- ``checkpoint``: `pusa checkpoint` writes the random-weights checkpoint (real sizes, or ``--layers`` blocks) to
  ``--model`` unless it is there already.
- ``service``: ``pusa-serve`` with ``serve_config.gpu.yaml`` (TextEncoder, VAE and DiT sharing the card) and the
  checkpoint's distill LoRA as the fast LoRA. From its start, ``GET /v1/models`` every 0.2 s and the page every
  second: what a client sees until the service is ready (status, latency, ``Retry-After``). Then, through HTTP
  (``POST /v1/videos`` with the image as a data URL, the job's SSE events), per variant (``--variants``) a
  one-step warm-up request and a timed one; per timed job the per-stage times from its events, each step's
  interval (events) against the DiT's own compute time (``DiT.stats``'s ``recent_steps``) and the round trip
  the runner saw (the event's ``step_s``). Fault: the DiT replica is killed (SIGKILL) during step 2 of a fast
  job; the job must complete, repeating at most one step, with the same MP4 bytes as the timed fast job.
- ``restart``: the page cache dropped again, then ``pusa-serve`` as in ``service`` (the node's compile cache now
  filled): start to ready and a timed fast request; a restart of the service on its node.
- ``inprocess``: `PusaPipeline.from_preset` on the same checkpoint, LoRAs and options in this process, the
  same requests (a one-step warm-up and a timed one per variant); ``fast_fp8`` quantizes the loaded DiT.
- ``capped``: the service again with FP8 GEMMs and the A6000 layout of ``serve_config.yaml`` emulated by
  per-process caps (``gpu_memory_gib``: DiT 47.5, TextEncoder and VAE 23.5 GiB); a timed fast request at 480p
  and one at 720p (the DiT's peak memory from its stats).
- ``oom``: the service with a bf16 DiT capped at ``--oom-dit-gib`` (default 36 GiB: the 28.7 GB of weights, a
  480p or 720p request and the warm-up fit; the largest request the API admits does not); a one-step standard
  request of ``--oom-size`` must fail with an out-of-memory reason, and a fast 480p request after it must
  complete on the same replica. (With FP8 GEMMs under the A6000's 47.5 GiB a 1920x1920x81 request ran for over
  five minutes without failing on an H100: at the 720p request's 74 KB of activations a token its 302,400 tokens
  need about 22 GB beside 14.7 GB of weights, so it is no out-of-memory check there.)
- ``wan22``: both models from one service: Pusa-Wan2.2's checkpoint beside ``--model`` (its experts, text encoder
  and VAE linked to the Pusa V1 checkpoint's; its Pusa LoRAs and a 4-step pair in Wan2.2-Lightning's layout
  written), its experts' deployments DiTHigh and DiTLow on the same card as Pusa V1's DiT (bf16 by default: the
  three DiTs and UMT5 need an H200's memory; ``--wan22-quantize fp8`` for FP8 GEMMs), each capped as on
  serve_config.yaml's A6000s (an expert alone on a card, under 44 GiB). Fast i2v at 480p on each model, taking
  turns (``--wan22-runs`` each, after an untimed one), Wan2.2 / V1 of the medians, the steps each expert's
  deployment ran; then a fast Wan2.2 request at 720p and each expert's peak memory.

``--size tiny`` runs the same phases on the CPU with the tiny configs in the same layout (no GPU asked for,
nothing compiled, requests at 64x48 and 96x64 with 9 frames): the check of the script before a device run.

Usage on the device (bench/README.md, "On the GPU machine")::

    bash bench/device/run.sh service_gpu --model /tmp/pusa-random --out $OUT/service_gpu.json
"""

from __future__ import annotations

import argparse
import base64
import copy
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from pusa_model.random_checkpoint import DISTILL_LORA_FILE, LIGHTNING_FILES  # noqa: E402

APP = "pusa"
PORT = 8000
URL = f"http://127.0.0.1:{PORT}"
PROMPT = "A cat walks on the grass, realistic, cinematic lighting"
# name: request fields beyond the common ones
VARIANTS = {"standard": {"steps": 10, "guidance": 5.0}, "fast": {"mode": "fast"}}
# (width, height, frames) of each request shape, at the checkpoint's size (`--size tiny`: the script's CPU check)
SHAPES = {"real": {"480p": (832, 480, 81), "720p": (1280, 720, 81)}, "tiny": {"480p": (64, 48, 9), "720p": (96, 64, 9)}}
V1, WAN22 = "pusa-v1", "pusa-wan2.2"
LORAS = {"distill": {"path": DISTILL_LORA_FILE, "alpha": 1.0, "fast": True}}
WAN22_LORAS = {"lightning": {"path": LIGHTNING_FILES[0], "path_2": LIGHTNING_FILES[1], "alpha": 1.0, "fast": True}}
A6000_CAPS = {"DiT": 47.5, "TextEncoder": 23.5, "VAE": 23.5}
# serve_config.yaml's Pusa-Wan2.2 layout: each expert alone on an A6000, held under 44 GiB
WAN22_CAPS = {**A6000_CAPS, "DiTHigh": 44.0, "DiTLow": 44.0}
# the deployments whose replicas compute a model's steps
DIT_DEPLOYMENTS = {V1: ("DiT",), WAN22: ("DiTHigh", "DiTLow")}


def log(*parts) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def image_data_url(width: int, height: int, seed: int = 0) -> str:
    """A random-pixel PNG as a data URL (the same bytes for the service and the in-process run)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def request_body(variant: str, shape: str | tuple[int, int, int] = "480p", steps: int | None = None, seed: int = 7,
                 model: str = V1) -> dict:
    """An i2v request of `variant` at `shape` (a name of SHAPES, or width, height, frames) on `model`."""
    width, height, frames = SHAPES[args_global.size][shape] if isinstance(shape, str) else shape
    body = {"model": model, "prompt": PROMPT, "task": "i2v", "images": [image_data_url(width, height)],
            "width": width, "height": height, "frames": frames, "seed": seed, **VARIANTS[variant]}
    if steps is not None:
        body["steps"] = steps
    return body


# -- the service ------------------------------------------------------------------------------------


def write_config(path: Path, dit_options: dict, caps: dict | None, wan22: bool = False, tiny: bool = False) -> None:
    """serve_config.gpu.yaml with the fast LoRA, these DiT options and memory caps; `wan22`: Pusa-Wan2.2 beside
    Pusa V1 (its experts' deployments DiTHigh and DiTLow on the same card, warmed up for fast requests only);
    `tiny`: on the CPU (no GPU asked for, nothing compiled)."""
    config = yaml.safe_load((ROOT / "serve_config.gpu.yaml").read_text())
    app = config["applications"][0]
    args = app["args"]
    args.update(loras=LORAS, dit_options=dit_options)
    if caps:
        args["gpu_memory_gib"] = caps
    if wan22:
        args.update(wan22_preset=WAN22, wan22_loras=WAN22_LORAS,
                    dit_warmup=[shape for shape in args["dit_warmup"] if shape["guidance"] == 1])
        dit = next(dep for dep in app["deployments"] if dep["name"] == "DiT")
        dit["ray_actor_options"]["num_gpus"] = 0.2  # with TextEncoder and VAE at 0.2 each: five on the card
        app["deployments"] += [{**copy.deepcopy(dit), "name": name} for name in DIT_DEPLOYMENTS[WAN22]]
    if tiny:
        args.update(dit_options={**args["dit_options"], "compile": False}, dit_warmup=[])
        for dep in app["deployments"]:
            dep["ray_actor_options"] = {"num_cpus": 0}
    path.write_text(yaml.safe_dump(config))


def changes(rows: list[dict], key) -> list[dict]:
    """The rows where `key` changes (the first of each run), with the run's length."""
    out: list[dict] = []
    for row in rows:
        if out and key(out[-1]) == key(row):
            out[-1]["count"] += 1
        else:
            out.append({**row, "count": 1})
    return out


class StartupProbe(threading.Thread):
    """Polls ``GET /v1/models`` every 0.2 s and the page every second from `t0` until stopped."""

    def __init__(self, t0: float) -> None:
        super().__init__(daemon=True)
        self.t0, self.api, self.page, self.stop = t0, [], [], threading.Event()

    def run(self) -> None:
        next_page = 0.0
        with httpx.Client(timeout=5) as client:
            while not self.stop.is_set():
                self.api.append(self._get(client, "/v1/models"))
                if time.monotonic() >= next_page:
                    self.page.append(self._get(client, "/", text=True))
                    next_page = time.monotonic() + 1.0
                time.sleep(0.2)

    def _get(self, client: httpx.Client, path: str, text: bool = False) -> dict:
        started = time.monotonic()
        row = {"t": round(started - self.t0, 2)}
        try:
            r = client.get(URL + path)
            row.update(status=r.status_code, retry_after=r.headers.get("retry-after"))
            if text:
                row["loading"] = "loading" in r.text.lower()
                row["body"] = r.text[:80]
        except httpx.HTTPError as exc:
            row["status"] = type(exc).__name__
        row["latency_s"] = round(time.monotonic() - started, 3)
        return row

    def summary(self) -> dict:
        def first(rows, pred):
            return next((r["t"] for r in rows if pred(r)), None)
        statuses: dict[str, int] = {}
        for r in self.api:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        return {"port_open_s": first(self.api, lambda r: isinstance(r["status"], int)),
                "first_503_s": first(self.api, lambda r: r["status"] == 503),
                "first_200_s": first(self.api, lambda r: r["status"] == 200),
                "api_statuses": statuses,
                "slowest_answer_s": max((r["latency_s"] for r in self.api if isinstance(r["status"], int)), default=None),
                "page": changes(self.page, lambda r: (r["status"], r.get("loading"))),
                "api": changes(self.api, lambda r: (r["status"], r.get("retry_after")))}


class Service:
    """``pusa-serve`` in a subprocess (its own local Ray), with this process joined to that Ray."""

    def __init__(self, config: Path, env: dict, workdir: Path, read_ahead: bool) -> None:
        self.t0 = time.monotonic()
        self.probe = StartupProbe(self.t0)
        self.probe.start()
        command = [sys.executable, "-m", "deployments.serve_command", str(config), "--start-timeout", "900"]
        self.proc = subprocess.Popen(command + (["--read-ahead"] if read_ahead else []), cwd=workdir, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.ready_s: float | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # each line with the seconds since the start (where start-up goes)
            self.lines.append(f"{time.monotonic() - self.t0:8.2f} {line.rstrip()}")
            if "Pusa service ready" in line and self.ready_s is None:
                self.ready_s = time.monotonic() - self.t0
                log(f"ready after {self.ready_s:.1f} s")

    def wait_ready(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while self.ready_s is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("pusa-serve did not start:\n" + "\n".join(self.lines[-40:]))
            time.sleep(0.5)
        first_job_t0 = time.monotonic()
        time.sleep(3)
        self.probe.stop.set()
        import ray
        ray.init(address="auto", namespace="serve", logging_level="ERROR")
        return {"ready_s": round(self.ready_s, 2), "startup": self.probe.summary(), "_first_job_t0": first_job_t0}

    def dit_stats(self, deployment: str = "DiT") -> dict:
        from ray import serve
        return serve.get_deployment_handle(deployment, APP).stats.remote().result(timeout_s=60)

    def stop(self) -> None:
        import ray
        from ray.serve import context
        if context._global_client is not None:  # its cached handles route to this service's replicas only
            context._global_client.shutdown_cached_handles()
            context._set_global_client(None)
        if ray.is_initialized():
            ray.shutdown()
        self.proc.terminate()  # pusa-serve's clean stop (SIGINT is ignored where this runs in the background)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)
        time.sleep(3)


def run_job(client: httpx.Client, body: dict, on_event=None) -> dict:
    """POST a job, follow its events to the end; the job's timings and its MP4's bytes."""
    submitted = time.monotonic()
    r = client.post(f"{URL}/v1/videos", json=body, timeout=120)
    if r.status_code != 200:
        raise RuntimeError(f"POST /v1/videos: {r.status_code} {r.text[:300]}")
    job_id = r.json()["id"]
    events = []
    with client.stream("GET", f"{URL}/v1/videos/{job_id}/events", timeout=httpx.Timeout(1800, connect=30)) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                event["_t"] = round(time.monotonic() - submitted, 3)
                events.append(event)
                if on_event is not None:
                    on_event(event)
    total = time.monotonic() - submitted
    final = events[-1] if events else {}
    out = {"id": job_id, "total_s": round(total, 3), "final": {k: v for k, v in final.items() if k != "timesteps"},
           "events": [{k: v for k, v in e.items() if k != "timesteps"} for e in events]}
    if final.get("type") == "completed":
        content = client.get(f"{URL}/v1/videos/{job_id}/content", timeout=300)
        out["mp4_bytes"] = len(content.content)
        out["_mp4"] = content.content
    return out


def step_split(job: dict, dit_steps: list[dict]) -> dict:
    """Each step's interval in the job's events against the DiT's compute time for that step."""
    steps = [e for e in job["events"] if e.get("type") == "step"]
    compute = {d["step"]: d["compute_s"] for d in dit_steps if d.get("job_id") == job["id"]}
    rows = []
    for prev, cur in zip(steps, steps[1:]):
        interval = cur["elapsed_s"] - prev["elapsed_s"]
        k = cur["step"] - 1
        rows.append({"step": cur["step"], "interval_s": round(interval, 4), "runner_call_s": cur.get("step_s"),
                     "dit_compute_s": compute.get(k)})
    full = [r for r in rows if r["dit_compute_s"] is not None]
    out = {"steps": rows}
    if full:
        med = lambda xs: float(np.median(xs))  # noqa: E731
        interval, dit = med([r["interval_s"] for r in full]), med([r["dit_compute_s"] for r in full])
        call = med([r["runner_call_s"] for r in full if r["runner_call_s"] is not None] or [np.nan])
        out.update(median_interval_s=round(interval, 4), median_dit_compute_s=round(dit, 4),
                   median_hop_s=round(call - dit, 4), median_overhead_s=round(interval - dit, 4),
                   overhead_pct=round(100 * (interval - dit) / dit, 2))
    return out


def stage_times(job: dict) -> dict:
    """Seconds from submission to each phase change in the job's events."""
    marks = {}
    for e in job["events"]:
        kind = e.get("type")
        if kind == "step" and "first_step" not in marks:
            marks["first_step"] = e["_t"]
        if kind in ("queued", "encoding", "decoding", "completed", "failed") and kind not in marks:
            marks[kind] = e["_t"]
    return marks


def service_phase(args, results: dict, name: str, dit_options: dict, caps: dict | None, steps_plan: list,
                  wan22_source: Path | None = None) -> None:
    """`pusa-serve` on the GPU profile with these DiT options and caps (`wan22_source`: Pusa-Wan2.2's checkpoint,
    served beside Pusa V1), each step of `steps_plan` run against it, then stopped."""
    env = {**os.environ, "PUSA_MODEL_SOURCE": str(args.model)}
    if wan22_source is not None:
        env["PUSA_WAN22_SOURCE"] = str(wan22_source)
    work = Path(tempfile.mkdtemp(prefix=f"pusa-{name}-"))
    config = work / "serve_config.yaml"
    write_config(config, dit_options, caps, wan22=wan22_source is not None, tiny=args.size == "tiny")
    service = Service(config, env, work, args.read_ahead)
    out = results.setdefault(name, {})
    try:
        out.update(service.wait_ready(args.start_timeout))
        first_job_t0 = out.pop("_first_job_t0")
        with httpx.Client() as client:
            for step in steps_plan:
                step(service, client, out)
                if "first_job_done_s" not in out and any(isinstance(v, dict) and v.get("final", {}).get("type") == "completed"
                                                         for v in out.values()):
                    out["first_job_done_s"] = round(out["ready_s"] + time.monotonic() - first_job_t0, 2)
                save(args, results)
    except Exception:  # noqa: BLE001 - record and go on to the next phase
        out["error"] = traceback.format_exc()
        out["log_tail"] = service.lines[-60:]
        log(out["error"])
    finally:
        stopping = time.monotonic()
        service.stop()
        out["stop_s"] = round(time.monotonic() - stopping, 2)
        out["log_tail"] = service.lines[-30:]
        Path(args.out).with_suffix(f".{name}.log").write_text("\n".join(service.lines) + "\n")
        keep_serve_logs(Path(args.out).with_suffix(f".{name}.serve-logs"))
        save(args, results)


def keep_serve_logs(folder: Path) -> None:
    """The logs of the Ray session that just ran (Serve's controller and replicas, the raylet, the agents):
    where start-up time went. Files over 4 MB are left out."""
    logs = Path(tempfile.gettempdir()) / "ray" / "session_latest" / "logs"
    for path in logs.rglob("*"):
        if path.is_file() and path.stat().st_size <= 4 << 20:
            target = folder / path.relative_to(logs)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)


def timed_job(service: Service, client: httpx.Client, body: dict) -> dict:
    """Run `body` through HTTP; the job with its stages, its per-step split against the compute of the DiT
    replicas of its model (both experts' for Pusa-Wan2.2) and their GPU memory."""
    job = run_job(client, body)
    stats = {name: service.dit_stats(name) for name in DIT_DEPLOYMENTS[body["model"]]}
    job["split"] = step_split(job, [step for s in stats.values() for step in s["recent_steps"]])
    job["stages"] = stage_times(job)
    job["steps_by_deployment"] = {name: sum(step.get("job_id") == job["id"] for step in s["recent_steps"])
                                  for name, s in stats.items()}
    job["dit_gpu_memory"] = {name: s.get("gpu_memory") for name, s in stats.items()}
    return job


def timed(variant: str, shape: str = "480p", label: str | None = None, model: str = V1):
    """Warm-up (one step; Pusa-Wan2.2: a whole request, so that both experts run) and a timed request of
    `variant` at `shape`."""
    def step(service: Service, client: httpx.Client, out: dict) -> None:
        key = label or variant
        log(f"{key}: warm-up")
        warm = run_job(client, request_body(variant, shape, steps=None if model == WAN22 else 1, model=model))
        out[f"{key}_warmup_s"] = warm["total_s"]
        log(f"{key}: timed")
        job = timed_job(service, client, request_body(variant, shape, model=model))
        out.setdefault("_mp4", {})[key] = job.pop("_mp4", None)
        out[key] = job
        log(f"{key}: {job['total_s']} s, {job['final'].get('type')}, split {job['split'].get('median_overhead_s')}")
    return step


def models_side_by_side(service: Service, client: httpx.Client, out: dict) -> None:
    """Fast i2v at 480p on Pusa V1 and on Pusa-Wan2.2 (the same number of 14B forwards), taking turns after
    an untimed request each; Wan2.2 / V1 of the median times."""
    for model in (V1, WAN22):
        log(f"{model}: warm-up")
        out[f"{model}_warmup_s"] = run_job(client, request_body("fast", model=model))["total_s"]
    for run in range(args_global.wan22_runs):
        for model in (V1, WAN22):
            job = timed_job(service, client, request_body("fast", model=model))
            job.pop("_mp4", None)
            out.setdefault(model, []).append(job)
            log(f"{model} run {run}: {job['total_s']} s, {job['final'].get('type')}, steps {job['steps_by_deployment']}")
    medians = {model: float(np.median([job["total_s"] for job in out[model]])) for model in (V1, WAN22)}
    out["wan22_over_v1"] = round(medians[WAN22] / medians[V1], 4)
    log(f"Wan2.2 / V1: {out['wan22_over_v1']}")


def wan22_checkpoint(args) -> Path:
    """The Pusa-Wan2.2 checkpoint beside `--model`: its experts, text encoder and VAE linked to the Pusa V1
    checkpoint's, its LoRAs (Pusa and the 4-step pair) written, unless there already."""
    from pusa_model.random_checkpoint import write_random_checkpoint

    folder = args.model.with_name(args.model.name + "-wan2.2")
    if not (folder / "model_index.json").is_file():
        write_random_checkpoint(folder, size=args.size, device=args.device, model=WAN22, share_from=args.model)
    return folder


def kill_dit_mid_job(service: Service, client: httpx.Client, out: dict) -> None:
    """SIGKILL the DiT replica during step 2 of a fast job; compare the MP4 with the timed fast job's."""
    pid = service.dit_stats()["pid"]
    killed = {}

    def on_event(event: dict) -> None:
        if event.get("type") == "step" and event["step"] == 1 and not killed:
            time.sleep(0.5)  # inside step 2
            os.kill(pid, signal.SIGKILL)
            killed["at_s"] = event["_t"] + 0.5
            log(f"killed DiT pid {pid}")

    job = run_job(client, request_body("fast"), on_event)
    steps = [e["step"] for e in job["events"] if e.get("type") == "step"]
    reference = out.get("_mp4", {}).get("fast")
    out["fault_kill_dit"] = {**{k: v for k, v in job.items() if k != "_mp4"}, "killed": killed, "steps_seen": steps,
                             "retries": [e for e in job["events"] if e.get("type") == "retry"],
                             "identical_to_uninterrupted": reference is not None and job.get("_mp4") == reference,
                             "new_pid": service.dit_stats()["pid"]}
    log(f"fault: {job['final'].get('type')}, identical {out['fault_kill_dit']['identical_to_uninterrupted']}")


def oom_then_recover(service: Service, client: httpx.Client, out: dict) -> None:
    job = run_job(client, request_body("standard", args_global.oom_size, steps=1))
    after = service.dit_stats().get("gpu_memory")
    recovery = run_job(client, request_body("fast"))
    out["fault_oom"] = {"job": {k: v for k, v in job.items() if k != "_mp4"}, "dit_memory_after": after,
                        "recovery": {k: v for k, v in recovery.items() if k != "_mp4"},
                        "dit_memory_after_recovery": service.dit_stats().get("gpu_memory")}
    log(f"oom: {job['final']}; recovery {recovery['final'].get('type')}")


# -- in process -------------------------------------------------------------------------------------


def inprocess_phase(args, results: dict) -> None:
    import torch

    os.environ["PUSA_MODEL_SOURCE"] = str(args.model)
    from pusa_model.loras import LoraRegistry
    from pusa_model.pipeline import PusaPipeline
    from pusa_model.quantize import quantize_blocks
    from pusa_model.request import parse_request, plan_request
    from pusa_model.transformer import DiTOptions

    out = results.setdefault("inprocess", {})
    registry = LoraRegistry.model_validate(LORAS)
    t0 = time.perf_counter()
    options = DiTOptions(compile=args.device == "cuda", attention="auto")
    pipe = PusaPipeline.from_preset(V1, device=args.device, dit_options=options, loras=registry, lora_base="cpu")
    out["load_s"] = round(time.perf_counter() - t0, 2)
    work = Path(tempfile.mkdtemp(prefix="pusa-inprocess-"))
    image = work / "start.png"
    width, height, _ = SHAPES[args.size]["480p"]
    image.write_bytes(base64.b64decode(image_data_url(width, height).split(",", 1)[1]))
    synchronize = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def generate(variant: str, steps: int | None = None) -> dict:
        body = request_body(variant, steps=steps)
        body["images"] = [str(image)]
        del body["model"]  # the API's field: this pipeline is the model
        plan = plan_request(parse_request(body), pipe.preset, loras=registry)
        synchronize()
        t = time.perf_counter()
        result = pipe.generate(plan, work / f"{variant}.mp4")
        synchronize()
        return {"total_s": round(time.perf_counter() - t, 3), "timings_s": {k: round(v, 3) for k, v in result.timings_s.items()},
                "_mp4": Path(result.video_path).read_bytes()}

    for variant in args.variants:
        key = variant
        if variant == "fast_fp8":
            out["fp8_gemms"] = quantize_blocks(pipe.dit.transformer, "fp8")
            key, variant = "fast_fp8", "fast"
        out[f"{key}_warmup_s"] = generate(variant, steps=1)["total_s"]
        job = generate(variant)
        out.setdefault("_mp4", {})[key] = job.pop("_mp4")
        out[key] = job
        log(f"inprocess {key}: {job['total_s']} s")
        save(args, results)
    del pipe
    torch.cuda.empty_cache()  # a no-op where CUDA never started (--size tiny)


# -- driver -----------------------------------------------------------------------------------------


def settle_disk() -> dict:
    """Write the checkpoint's dirty pages out, then drop the page cache where allowed (root), so that what
    follows reads the weights from the disk rather than from memory, with no write-back beside it."""
    t0 = time.perf_counter()
    os.sync()
    out = {"sync_s": round(time.perf_counter() - t0, 2)}
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        out["dropped"] = True
    except OSError as exc:
        out["dropped"] = f"no: {exc}"
    return out


def save(args, results: dict) -> None:
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if not k.startswith("_")}
        return value
    Path(args.out).write_text(json.dumps(clean(results), indent=1, default=str))


def compare(results: dict) -> dict:
    """Service / in-process per variant, and whether the service's MP4 is the in-process one byte for byte."""
    rows = {}
    for name in ("service", "capped"):
        for variant in ("standard", "fast", "fast_fp8"):
            service, local = results.get(name, {}).get(variant), results.get("inprocess", {}).get(variant)
            if isinstance(service, dict) and isinstance(local, dict) and "total_s" in service:
                same = results[name].get("_mp4", {}).get(variant) == results["inprocess"].get("_mp4", {}).get(variant)
                rows[f"{name}/{variant}"] = {"service_s": service["total_s"], "inprocess_s": local["total_s"],
                                             "ratio": round(service["total_s"] / local["total_s"], 4),
                                             "same_mp4": same}
    return rows


args_global: argparse.Namespace


def main() -> int:
    global args_global
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/pusa-random"))
    parser.add_argument("--layers", type=int, help="transformer blocks of the checkpoint (default: all 40)")
    parser.add_argument("--phases", default="checkpoint,service,restart,inprocess,capped,oom")
    parser.add_argument("--variants", default="standard,fast,fast_fp8", help="in-process variants")
    parser.add_argument("--service-variants", default="standard,fast")
    parser.add_argument("--fault", action=argparse.BooleanOptionalAction, default=True,
                        help="kill the DiT replica mid-job in the service phase")
    parser.add_argument("--read-ahead", action=argparse.BooleanOptionalAction, default=True,
                        help="start pusa-serve with --read-ahead")
    parser.add_argument("--oom-size", default="1920x1920x81", help="WIDTHxHEIGHTxFRAMES of the request past the cap")
    parser.add_argument("--oom-dit-gib", type=float, default=36.0, help="the bf16 DiT's cap in the oom phase")
    parser.add_argument("--wan22-runs", type=int, default=2, help="timed fast requests per model in the wan22 phase")
    parser.add_argument("--wan22-quantize", choices=("none", "fp8"), default="none",
                        help="the three DiTs' GEMMs in the wan22 phase (bf16 needs an H200's memory)")
    parser.add_argument("--size", choices=("real", "tiny"), default="real",
                        help="tiny: the tiny configs in the same layout, on the CPU (the script's check off the GPU)")
    parser.add_argument("--start-timeout", type=float, default=900)
    parser.add_argument("--out", default="service_gpu.json")
    args = parser.parse_args()
    args.variants = args.variants.split(",")
    args.device = "cuda" if args.size == "real" else "cpu"
    args.oom_size = tuple(int(v) for v in args.oom_size.split("x"))
    args_global = args
    phases = args.phases.split(",")
    import torch
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    results: dict = {"device": device, "torch": torch.__version__, "size": args.size, "phases": phases}
    if "checkpoint" in phases:
        if (args.model / "model_index.json").is_file():
            results["checkpoint"] = "present"
        else:
            from pusa_model.random_checkpoint import write_random_checkpoint
            t0 = time.perf_counter()
            results["checkpoint"] = write_random_checkpoint(args.model, size=args.size, device=args.device,
                                                            layers=args.layers)
            results["checkpoint"]["total_s"] = round(time.perf_counter() - t0, 2)
            torch.cuda.empty_cache()
        log("checkpoint", results["checkpoint"])
        results["page_cache"] = settle_disk()
        log("page cache", results["page_cache"])
        save(args, results)
    standard_options = {"compile": True, "attention": "auto"}

    def service() -> None:
        plan = [timed(v) for v in args.service_variants.split(",")] + ([kill_dit_mid_job] if args.fault else [])
        service_phase(args, results, "service", standard_options, None, plan)

    def restart() -> None:
        results["restart_page_cache"] = settle_disk()
        service_phase(args, results, "restart", standard_options, None, [timed("fast")])

    def inprocess() -> None:
        try:
            inprocess_phase(args, results)
        except Exception:  # noqa: BLE001
            results.setdefault("inprocess", {})["error"] = traceback.format_exc()
            log(results["inprocess"]["error"])

    def capped() -> None:
        plan = [timed("fast", label="fast_fp8"), timed("fast", "720p", label="fast_fp8_720p")]
        service_phase(args, results, "capped", {**standard_options, "quantize": "fp8"}, A6000_CAPS, plan)

    def oom() -> None:
        caps = {**A6000_CAPS, "DiT": args.oom_dit_gib}
        service_phase(args, results, "oom", standard_options, caps, [oom_then_recover])

    def wan22() -> None:
        try:
            source = wan22_checkpoint(args)
        except Exception:  # noqa: BLE001 - record and go on to the next phase
            results["wan22"] = {"error": traceback.format_exc()}
            log(results["wan22"]["error"])
            save(args, results)
            return
        options = {**standard_options, **({"quantize": "fp8"} if args.wan22_quantize == "fp8" else {})}
        plan = [models_side_by_side, timed("fast", "720p", label="wan22_fast_720p", model=WAN22)]
        service_phase(args, results, "wan22", options, WAN22_CAPS, plan, wan22_source=source)

    runs = {"service": service, "restart": restart, "inprocess": inprocess, "capped": capped, "oom": oom,
            "wan22": wan22}
    for phase in phases:  # in the order given
        runs.get(phase, lambda: None)()
    results["compare"] = compare(results)
    save(args, results)
    print(json.dumps(results["compare"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
