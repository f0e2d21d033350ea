"""Faults on a real local Ray, over real HTTP, with the SQLite job database and a local store: a lost DiT,
VAE or TextEncoder replica, a hung VAE, a runner killed mid-job (resumed from its checkpoint), cancellation,
retention, and LoRA-alpha routing across DiT replicas.

One service serves the whole module (starting one takes most of a minute here): two DiT replicas without
autoscaling, fast health checks (so Serve replaces a killed or frozen replica within seconds), one runner
whose leases expire 2 s after its last renewal, that gives up on a job whose runner was lost twice
(`max_takeovers: 1`), and stage timeouts short enough to catch a frozen replica in seconds.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest
from service_probe import ServiceProbe, steps_done
from videoapi import image_bytes

from pusa_jobs.jobs import TERMINAL
from pusa_model.media import probe_video
from serving import default_database, running_service

STAGES = {"retries": 4, "backoff_s": 0.5, "backoff_max_s": 2,
          "text_encode": {"base_s": 5}, "vae_encode": {"base_s": 5, "per_megavoxel_s": 20},
          "vae_decode": {"base_s": 5, "per_megavoxel_s": 20}, "dit_step": {"base_s": 20, "per_megavoxel_s": 10}}
RUNNER = {"lease_ttl_s": 2.0, "renew_s": 0.5, "poll_s": 0.2, "max_takeovers": 1, "sweep_s": 0.5, "stages": STAGES}
FAST_CHECKS = {"health_check_period_s": 1, "health_check_timeout_s": 3}
DEPLOYMENTS = {
    "DiT": {"autoscaling_config": None, "num_replicas": 2, **FAST_CHECKS},
    "Router": FAST_CHECKS, "Runner": FAST_CHECKS, "VAE": FAST_CHECKS, "TextEncoder": FAST_CHECKS,
}
REPLICAS = {"DiT": 2, "Router": 1, "Runner": 1, "VAE": 1, "TextEncoder": 1}
# One 1024x1024 frame: a DiT step of the tiny model takes ~0.3 s on a CPU core (attention over
# 4096 tokens) while the VAE decodes in a few seconds; 64x64 steps take milliseconds.
SLOW = {"prompt": "a cat", "size": "1024x1024", "frames": 1}
FAST = {"prompt": "a cat", "size": "64x64", "frames": 17}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    store = str(tmp_path_factory.mktemp("faults") / "store")
    database = default_database(store)
    with running_service(store, runner=RUNNER, deployments=DEPLOYMENTS) as url:
        probe = ServiceProbe(url, database, REPLICAS)
        probe.store = Path(store)
        try:
            yield probe
        finally:
            probe.close()


@pytest.fixture
def svc(service):
    service.wait_ready()
    return service


def retries(events: list[dict], stage: str) -> list[dict]:
    return [e for e in events if e["type"] == "retry" and e["stage"] == stage]


def test_dit_replica_lost_mid_job_costs_one_step(svc):
    request = {**SLOW, "steps": 10, "seed": 11}
    _, expected = svc.run(**request)

    job_id = svc.submit(**request)
    svc.wait_steps(job_id, 3)
    svc.kill_mid_step(job_id, "DiT", "dit", steps_before=8)
    job = svc.wait_ended(job_id, timeout=120)
    assert job.status == "completed", job.error

    events = svc.sse_events(job_id)
    types = [e["type"] for e in events]
    retry = retries(events, "dit")[0]
    assert retry["reason"] in ("ActorDiedError", "RayActorError", "ActorUnavailableError"), retry
    # only the step in flight was lost: every step reported once, in order, the job never restarted
    assert [e["step"] for e in events if e["type"] == "step"] == list(range(1, 11))
    assert types.count("encoding") == 1 and types[-1] == "completed"
    assert svc.content(job_id) == expected  # same seed, same video, though a replica died mid-step


def test_vae_replica_lost_mid_decode_is_retried(svc):
    request = {**SLOW, "steps": 2, "seed": 12}
    _, expected = svc.run(**request)
    job_id = svc.submit(**request)
    svc.wait_for(job_id, lambda j, e: e[-1]["type"] == "decoding" or j.terminal, timeout=60, poll=0.02)
    deadline = time.monotonic() + 10
    while svc.kill_busy("VAE") is None:  # the decode call has reached the replica
        assert time.monotonic() < deadline and not svc.record(job_id).terminal, "the decode never ran"
        time.sleep(0.01)
    job = svc.wait_ended(job_id, timeout=120)
    assert job.status == "completed", job.error
    assert retries(svc.events(job_id), "vae")
    assert svc.content(job_id) == expected


def test_text_encoder_replica_lost_mid_call_is_retried(svc):
    pids = svc.freeze("TextEncoder")  # the call reaches a replica that does not answer...
    try:
        job_id = svc.submit(**FAST, steps=2, seed=13)
        svc.wait_for(job_id, lambda j, e: e[-1]["type"] == "encoding", timeout=30)
        time.sleep(0.5)
        svc.kill_all("TextEncoder")  # ... and dies
    finally:
        svc.thaw(pids)
    job = svc.wait_ended(job_id, timeout=120)
    assert job.status == "completed", job.error
    assert retries(svc.events(job_id), "text_encoder")


def test_hung_vae_times_out_and_the_job_ends_with_a_reason(svc):
    pids = svc.freeze("VAE")  # a replica that never answers (Serve replaces it once its health check fails)
    try:
        job_id = svc.submit(**FAST, steps=2, seed=14)
        job = svc.wait_ended(job_id, timeout=120)
    finally:
        svc.thaw(pids)
    hung = retries(svc.events(job_id), "vae")
    assert hung and "no answer within" in hung[0]["reason"], svc.events(job_id)
    assert job.status == "completed" or (job.status == "failed" and job.error["code"] == "vae_unavailable"), job


def test_cancel_frees_the_dit_within_a_step(svc):
    steps = 50
    before = svc.dit_steps()
    job_id = svc.submit(**SLOW, steps=steps, seed=3)
    svc.wait_steps(job_id, 3)

    t0 = time.monotonic()
    view = svc.http.post(f"/v1/videos/{job_id}/cancel").json()
    # steps recorded when the cancel flag was already there (progress = 2 + 93 k / N)
    marked = max(k for k in range(steps + 1) if 2 + int(93 * k / steps) <= view["progress"])
    while (status := svc.retrieve(job_id)["status"]) not in TERMINAL and time.monotonic() - t0 < 30:
        time.sleep(0.02)
    latency = time.monotonic() - t0
    assert status == "cancelled"

    events = svc.events(job_id)
    step_times = [e["elapsed_s"] for e in events if e["type"] == "step"]
    longest_step = max(b - a for a, b in zip(step_times, step_times[1:]))
    assert latency < longest_step + 1.0, (latency, longest_step)
    cancelled = events[-1]
    assert cancelled["type"] == "cancelled" and cancelled["step"] == steps_done(events) < steps
    assert cancelled["step"] <= marked + 1, (cancelled, marked)  # at most the step in flight ran on

    time.sleep(max(1.0, 2 * longest_step))  # a step started ahead of the cancel's write ends meanwhile
    ran = svc.dit_steps() - before
    # the DiT ran the steps the job reported, and at most the one started ahead ...
    assert cancelled["step"] <= ran <= cancelled["step"] + 1
    time.sleep(max(1.0, 2 * longest_step))
    assert svc.dit_steps() - before == ran  # ... and then stopped
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
            if {s["lora_alpha"] for s in svc.stats("DiT").values()} == {alpha}:
                assert len(videos) == 1  # whichever replica ran which step
                return videos.pop()
        raise AssertionError(f"DiT replicas hold {svc.stats('DiT')} after jobs at alpha {alpha}")

    first = fuse_everywhere(1.0)
    assert fuse_everywhere(2.0) != first  # every replica went 1.0 -> 2.0; the alpha matters

    _, again = svc.run(**request, lora_alpha=1.0)  # every step ran on a replica gone 2.0 -> 1.0
    assert again == first  # re-fused from the base weights: nothing accumulated
    # (until Serve learns which replica holds 1.0, a step may go to either and re-fuse there)
    held = {s["lora_alpha"] for s in svc.stats("DiT").values()}
    assert 1.0 in held and held <= {1.0, 2.0}, held


def test_a_long_video_is_a_chain_of_windows_that_outlives_a_lost_dit_replica(svc, tiny_pipeline, tmp_path):
    request = {"prompt": "a long walk", "size": "256x256", "frames": 25, "window_frames": 17, "steps": 4,
               "seed": 21}  # 3 windows of 17 frames
    job_id = svc.submit(**request)
    svc.wait_for(job_id, lambda j, e: j.terminal or any(x["type"] == "step" and x.get("segment") == 1 for x in e),
                 timeout=60, poll=0.01)
    svc.kill_mid_step(job_id, "DiT", "dit", steps_before=8)  # a step of the second window
    job = svc.wait_ended(job_id, timeout=120)
    assert job.status == "completed", job.error

    events = svc.sse_events(job_id)
    assert retries(events, "dit") and all(r["step"] in (5, 6, 7, 8) for r in retries(events, "dit"))
    ordered = [(e["type"], e.get("segment")) for e in events if e["type"] in ("step", "segment")]
    assert ordered == [x for w in range(3) for x in [("step", w)] * 4 + [("segment", w)]]  # window by window
    assert [e["step"] for e in events if e["type"] == "step"] == list(range(1, 13))  # counted over the windows
    segments = [e for e in events if e["type"] == "segment"]
    assert [(s["segments"], s["frames"]) for s in segments] == [(3, 17)] * 3
    for s in segments:  # each window's own MP4, at the URL its event gave
        response = svc.http.get(s["url"])
        assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
        assert video_frames(response.content, tmp_path) == 17
    video = svc.content(job_id)
    assert video_frames(video, tmp_path) == 25
    assert video == svc.reference_video(tiny_pipeline, job_id, tmp_path)  # one MP4, the in-process chain's to the byte, though a replica died in window 2

    assert svc.http.get(f"/v1/videos/{job_id}/content?segment=3").status_code == 409
    assert svc.http.get(f"/v1/videos/{job_id}/content?segment=0&variant=thumbnail").json()["error"]["param"] == \
        "segment"
    refused = svc.http.post("/v1/videos", json={**request, "frames": 405})  # over the deployment's api.max_frames
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "frames"


def video_frames(data: bytes, folder: Path) -> int:
    path = folder / "probe.mp4"
    path.write_bytes(data)
    return probe_video(path)["frames"]


def test_concurrent_jobs_with_one_seed_make_one_video(svc):
    request = {**FAST, "steps": 8, "seed": 31}
    ids = [svc.submit(**request) for _ in range(2)]
    for job_id in ids:
        assert svc.wait_ended(job_id, timeout=120).status == "completed"
    assert svc.content(ids[0]) == svc.content(ids[1])


def test_runner_killed_mid_job_resumes_from_its_checkpoint(svc):
    steps = 16
    request = {**SLOW, "steps": steps, "seed": 5}
    _, expected = svc.run(**request)

    before = svc.dit_steps()
    job_id = svc.submit(**request)
    svc.wait_steps(job_id, 4)
    svc.kill_all("Runner")
    job = svc.wait_ended(job_id, timeout=90)
    assert job.status == "completed", job.error
    assert job.takeovers == 1

    events = svc.events(job_id)
    assert [e["seq"] for e in events] == list(range(len(events)))
    requeued = [e for e in events if e["type"] == "queued" and e.get("requeued")]
    assert len(requeued) == 1 and requeued[0]["resume_step"] >= 4, requeued
    assert [e["step"] for e in events if e["type"] == "step"] == list(range(1, steps + 1))  # each step once
    # at most the steps in flight were computed twice: the one being written and the one started ahead
    assert steps <= svc.dit_steps() - before <= steps + 2
    assert svc.content(job_id) == expected  # resumed from the exact latents: the same video


def test_runner_lost_twice_fails_the_job(svc):
    job_id = svc.submit(**SLOW, steps=40, seed=6)
    svc.wait_steps(job_id, 2)
    svc.kill_all("Runner")
    svc.wait_for(job_id, lambda j, e: any(x.get("requeued") for x in e) or j.terminal, timeout=60, poll=0.02)
    svc.kill_all("Runner")
    job = svc.wait_ended(job_id, timeout=90)
    assert job.status == "failed" and job.error["code"] == "runner_lost", job.error
    assert svc.events(job_id)[-1]["type"] == "failed"
    svc.wait_ready()
    view = svc.retrieve(job_id)
    assert view["status"] == "failed" and view["error"]["code"] == "runner_lost"


def test_expired_jobs_lose_their_record_and_files(svc):
    png = "data:image/png;base64," + base64.b64encode(image_bytes("PNG", size=(64, 64))).decode()
    job_id, _ = svc.run(prompt="kept a while", task="i2v", images=[png], steps=2, frames=5)
    view = svc.retrieve(job_id)
    assert view["expires_at"] >= view["completed_at"] + 7 * 86400 - 1  # the default retention: a week
    files = lambda: sorted(p.relative_to(svc.store).as_posix() for p in svc.store.rglob(f"*{job_id}*/*"))  # noqa: E731
    assert files() == [f"inputs/{job_id}/images[0]", f"results/{job_id}/thumbnail.webp", f"results/{job_id}/video.mp4"]
    svc.expire(job_id)  # as if the week had passed
    assert files() == [] and svc.events(job_id) == []
