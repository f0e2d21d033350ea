"""What operators see, on a real local Ray: the service's metrics scraped from Ray's Prometheus endpoint
after a mix of jobs (completed, failed on bad media, cancelled, one whose DiT replica was killed, one
taken over from a lost runner), one job followed through the JSON logs of every replica, a runner whose
job loop died replaced by Serve, and the Grafana dashboard's queries against the metrics that exist."""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from service_probe import ServiceProbe, steps_done

from pusa_jobs.job_files import JobFiles
from pusa_jobs.jobs import Job, job_created_at, job_plan, new_job_id
from pusa_jobs.observability import Metrics
from pusa_jobs.storage import open_store
from pusa_model.presets import get_preset
from pusa_model.request import parse_request, plan_request
from serving import default_database, free_port, running_service

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
FAST_CHECKS = {"health_check_period_s": 1, "health_check_timeout_s": 3}
DEPLOYMENTS = {"DiT": {"autoscaling_config": None, "num_replicas": 2, **FAST_CHECKS}, "Runner": FAST_CHECKS}
REPLICAS = {"DiT": 2, "Router": 1, "Runner": 1, "VAE": 1, "TextEncoder": 1}
RUNNER = {"lease_ttl_s": 2.0, "renew_s": 0.5, "poll_s": 0.2}
SLOW = {"prompt": "a cat", "size": "1024x1024", "frames": 1}  # DiT steps of ~0.3 s here
FAST = {"prompt": "a cat", "size": "64x64", "frames": 17}


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    store = str(tmp_path_factory.mktemp("observed") / "store")
    port = free_port()
    with running_service(store, runner=RUNNER, deployments=DEPLOYMENTS, metrics_port=port) as url:
        probe = ServiceProbe(url, default_database(store), REPLICAS)
        probe.store, probe.metrics_url = store, f"http://127.0.0.1:{port}/metrics"
        try:
            yield probe
        finally:
            probe.close()


def direct_job(request: dict, **fields) -> Job:
    """A job as the API would have stored it, for jobs the API cannot make (bad media, a lost runner)."""
    plan = plan_request(parse_request(request), get_preset("tiny"))
    job_id = new_job_id()
    return Job(id=job_id, created_at=job_created_at(job_id), request=plan.request.model_dump(), plan=job_plan(plan),
               **fields)


def scrape(url: str) -> dict[str, list[tuple[dict, float]]]:
    """Every sample of the endpoint's `ray_pusa_*` metrics: {sample name: [(labels, value)]}."""
    samples = defaultdict(list)
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for sample in family.samples:
            if sample.name.startswith("ray_pusa_"):
                samples[sample.name].append((sample.labels, sample.value))
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (over replicas and other labels)."""
    return sum(v for got, v in samples.get(name, []) if all(got.get(k) == x for k, x in labels.items()))


@pytest.fixture(scope="module")
def mix(observed):
    """Run the module's jobs once; returns their ids by kind."""
    svc = observed
    svc.wait_ready()
    ids = {"completed": svc.run(**FAST, steps=3, seed=1)[0]}

    files = JobFiles(open_store(svc.store))
    bad = direct_job({"task": "i2v", "prompt": "p", "images": ["images[0]"], "width": 64, "height": 64,
                      "frames": 5, "steps": 2})
    bad.inputs = {"images[0]": files.put_input(bad.id, "images[0]", b"this is not an image")}
    svc.jobs.create(bad, {"type": "queued", "position": 1})
    ids["bad_media"] = bad.id

    ids["cancelled"] = svc.submit(**SLOW, steps=40, seed=2)
    svc.wait_steps(ids["cancelled"], 2)
    svc.http.post(f"/v1/videos/{ids['cancelled']}/cancel")

    ids["dit_lost"] = svc.submit(**SLOW, steps=10, seed=3)
    svc.wait_steps(ids["dit_lost"], 3)
    svc.kill_mid_step(ids["dit_lost"], "DiT", "dit", steps_before=10)

    lost = direct_job({"prompt": "p", "width": 64, "height": 64, "frames": 17, "steps": 3}, status="in_progress",
                      lease_holder="runner-gone", lease_epoch=1, lease_expires_at=0.0)
    svc.jobs.create(lost, {"type": "queued", "position": 1})
    ids["taken_over"] = lost.id

    assert svc.http.post("/v1/videos", json={**FAST, "steps": 0}).status_code == 400
    for job_id in ids.values():
        svc.wait_ended(job_id, timeout=120)
    return ids


def test_metrics_count_jobs_stages_and_faults(observed, mix):
    svc = observed
    jobs = {kind: svc.record(job_id) for kind, job_id in mix.items()}
    assert [jobs[k].status for k in mix] == ["completed", "failed", "cancelled", "completed", "completed"]
    assert jobs["bad_media"].error["code"] == "invalid_request"
    steps = sum(steps_done(svc.events(job_id)) for job_id in mix.values())

    expected = {  # (sample, labels): value
        ("ray_pusa_jobs_accepted_total", (("task", "t2v"), ("preset", "tiny"))): 3,
        ("ray_pusa_jobs_finished_total", (("status", "completed"), ("task", "t2v"), ("reason", ""))): 3,
        ("ray_pusa_jobs_finished_total", (("status", "failed"), ("task", "i2v"), ("reason", "invalid_request"))): 1,
        ("ray_pusa_jobs_finished_total", (("status", "cancelled"), ("reason", ""))): 1,
        ("ray_pusa_queue_wait_seconds_count", (("preset", "tiny"),)): 4,  # fresh claims; the adopted job is not
        ("ray_pusa_lease_takeovers_total", ()): 1,
        ("ray_pusa_step_seconds_count", (("preset", "tiny"),)): steps,
        ("ray_pusa_checkpoint_seconds_count", (("store", "file"),)): steps,
        ("ray_pusa_stage_seconds_count", (("stage", "text_encode"), ("deployment", "TextEncoder"), ("gpu", "cpu"))): 5,
        # t2v has no conditioning to encode, and the bad media fail their encode: no conditioning_encode
        ("ray_pusa_stage_seconds_count", (("stage", "conditioning_encode"), ("deployment", "VAE"))): 0,
        ("ray_pusa_stage_seconds_count", (("stage", "decode"), ("deployment", "VAE"))): 3,
        ("ray_pusa_stage_seconds_count", (("stage", "write"), ("deployment", "VAE"))): 3,
    }
    deadline = time.monotonic() + 30
    while True:  # the agent exports what the replicas report every second
        samples = scrape(svc.metrics_url)
        got = {key: total(samples, key[0], **dict(key[1])) for key in expected}
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == expected
    retries = [(labels, v) for labels, v in samples["ray_pusa_stage_retries_total"] if labels["stage"] == "dit"]
    assert retries and all(labels["cause"] in ("ActorDiedError", "RayActorError", "ActorUnavailableError")
                           for labels, _ in retries), retries
    assert total(samples, "ray_pusa_requests_rejected_total", code="400", type="invalid_request_error") >= 1
    assert total(samples, "ray_pusa_stage_seconds_count", stage="dit_step", deployment="DiT") >= 1
    assert total(samples, "ray_pusa_lora_fuse_seconds_count", gpu="cpu") >= 1  # each DiT replica fused alpha 1.4
    assert total(samples, "ray_pusa_dit_first_step_seconds_count", compiled="false") >= 1
    assert samples["ray_pusa_queue_depth"] and samples["ray_pusa_jobs_running"]
    # bucket counts are cumulative and end at the count
    buckets = sorted((float(labels["le"]), v) for labels, v in samples["ray_pusa_step_seconds_bucket"])
    assert buckets[-1] == (float("inf"), steps) and all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))


def serve_log_lines(job_id: str) -> list[dict]:
    """Every JSON line of the Serve replica logs that belongs to `job_id`, in time order."""
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    lines = []
    for path in logs.glob("replica_*.log"):
        for raw in path.read_text(errors="replace").splitlines():
            if job_id in raw:
                line = json.loads(raw)
                if job_id in (line.get("video_id"), line.get("request_id")):
                    lines.append(line)
    return sorted(lines, key=lambda line: line["timestamp_ns"])


def test_one_job_is_followed_through_every_replica_log(observed, mix):
    job_id = mix["dit_lost"]
    lines = serve_log_lines(job_id)
    by_deployment = defaultdict(list)
    for line in lines:
        by_deployment[line["deployment"]].append(line.get("job_event") or line["message"].split(" OK")[0])
    assert set(by_deployment) == {"pusa_Router", "pusa_Runner", "pusa_TextEncoder", "pusa_VAE", "pusa_DiT"}
    assert by_deployment["pusa_Router"] == ["accepted"]
    runner = [e for e in by_deployment["pusa_Runner"] if e in ("claimed", "step", "retry", "finished")]
    assert runner[0] == "claimed" and runner[-1] == "finished" and "retry" in runner, runner
    assert by_deployment["pusa_TextEncoder"] == ["CALL encode"]
    assert by_deployment["pusa_VAE"] == ["CALL decode_to_store"]  # t2v: no conditioning to encode
    assert by_deployment["pusa_DiT"].count("CALL step") >= 10
    events = [line.get("job_event") for line in lines if line.get("job_event")]
    assert events[0] == "accepted" and events[-1] == "finished"
    assert [line["step"] for line in lines if line.get("job_event") == "step"] == list(range(1, 11))
    for line in lines:  # the fields an operator filters on
        assert line["levelname"] and line["replica"] and line["timestamp_ns"]


def test_a_runner_whose_job_loop_died_is_replaced(observed):
    svc = observed
    svc.wait_ready()
    ((name, actor),) = svc.replicas("Runner")

    def stop_dispatch(replica_actor) -> str:  # runs inside the replica's process
        wrapper = replica_actor._replica_impl._user_callable_wrapper
        runner = wrapper._callable
        wrapper._user_code_event_loop.call_soon_threadsafe(runner._loops[0].cancel)
        return runner.holder

    holder = ray.get(actor.__ray_call__.remote(stop_dispatch))
    deadline = time.monotonic() + 60
    while [n for n, _ in svc.replicas("Runner")] in ([name], []):
        assert time.monotonic() < deadline, "the runner was not replaced"
        time.sleep(0.25)
    svc.wait_ready()
    job_id, _ = svc.run(**FAST, steps=2, seed=9)
    claimed = [line for line in serve_log_lines(job_id) if line.get("job_event") == "claimed"]
    assert claimed and claimed[0]["holder"] != holder


def test_dashboard_queries_the_service_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exported = {f"ray_{metric.info['name']}" for metric in vars(Metrics()).values()}
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {"Queue depth", "Jobs finished per minute", "Step time", "Failures by reason",
            "DiT GPU memory peak"} <= titles
    for expr in exprs:
        names = set(re.findall(r"ray_pusa_\w+", expr))
        assert names, expr
        for name in names:
            base = name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum").removesuffix("_total")
            assert base in exported, (name, sorted(exported))
    assert {panel["datasource"]["uid"] for panel in dashboard["panels"]} == {"${datasource}"}
