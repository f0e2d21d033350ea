"""Both models from one application, on the tiny presets through a real local Ray Serve: the app's
``wan22_preset: tiny-wan2.2`` adds the DiT deployments DiTHigh and DiTLow (one per expert) beside Pusa V1's
DiT, with the TextEncoder and VAE shared; ``wan22_loras`` holds a stand-in 4-step LoRA pair for mode fast.
A ``model: pusa-wan2.2`` job's video is the in-process pipeline's to the byte, each expert's deployment runs
exactly the steps of its expert (the boundary rule), and a ``pusa-v1`` job on the same app is unchanged. A
Runner replica killed before the experts' switch is replaced and the job resumes across it to the same video;
in process, a runner killed at the switch's step is succeeded by another that resumes to the same video.
The fronts: `pusa batch --preset tiny-wan2.2` and `/v1/batches` run Pusa-Wan2.2 rows (and fail or refuse another
model's, naming ``model``), `pusa client --model`, an extension on its source's model, and the page's model selector."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
import ray
from service_probe import ServiceProbe, one_thread
from serving import default_database, running_service
from test_job_run import LocalHandle
from test_wan22 import write_distill_loras
from videoapi import image_bytes

from deployments.batch_api import BatchRoutes
from deployments.batch_run import BatchRun, ModelNotServed
from deployments.dit import DiT
from deployments.job_run import JobRun, RunContext
from deployments.openai_api import ApiError
from deployments.runner import RunnerSettings
from deployments.stages import Stages, StageSettings
from deployments.text_encoder import TextEncoder
from deployments.vae import VAE
from pusa_batch.rows import batch_model, read_row
from pusa_batch.run import BatchSettings
from pusa_cli import main as cli_main
from pusa_jobs.db import open_database
from pusa_jobs.job_files import JobFiles
from pusa_jobs.job_store import JobStore
from pusa_jobs.jobs import Job, job_created_at, job_plan, new_job_id
from pusa_jobs.storage import open_store
from pusa_model.errors import InvalidRequest
from pusa_model.loras import LoraRegistry
from pusa_model.pipeline import PusaPipeline, model_folder
from pusa_model.presets import get_preset
from pusa_model.request import parse_request, plan_request, replan

WAN22 = "tiny-wan2.2"
MODELS = {"pusa-v1": "tiny", "pusa-wan2.2": WAN22}
ZERO_CPU = {"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 1}
# one replica each, so that the replicas' step counts are the deployments'
DEPLOYMENTS = {"DiT": {"autoscaling_config": None, "num_replicas": 1}, "DiTHigh": ZERO_CPU, "DiTLow": ZERO_CPU}
# short leases: a killed runner's job is adopted within seconds
RUNNER = {"lease_ttl_s": 2.0, "renew_s": 0.5, "poll_s": 0.2, "max_takeovers": 1}
T2V = {"model": "pusa-wan2.2", "prompt": "a cat", "size": "64x64", "frames": 9, "steps": 6, "guidance": 3.0,
       "guidance_2": 2.0, "seed": 3}
I2V = {"model": "pusa-wan2.2", "prompt": "a cat", "size": "64x64", "frames": 9, "steps": 4, "mode": "fast",
       "seed": 4, "input_reference": "data:image/png;base64," + base64.b64encode(image_bytes("PNG")).decode()}


@pytest.fixture(scope="module")
def lightning(tmp_path_factory) -> LoraRegistry:
    """The Wan2.2 registry: a stand-in for Wan2.2-Lightning's 4-step pair, the LoRA of mode fast."""
    return write_distill_loras(model_folder(get_preset(WAN22)), tmp_path_factory.mktemp("lightning"))


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_folder, lightning):
    store = str(tmp_path_factory.mktemp("wan22") / "store")
    database = default_database(store)
    args = {"wan22_preset": WAN22, "wan22_loras": lightning.model_dump()}
    with running_service(store, runner=RUNNER, deployments=DEPLOYMENTS, args=args) as url:
        probe = ServiceProbe(url, database, {"DiT": 1, "DiTHigh": 1, "DiTLow": 1})
        try:
            probe.wait_ready()
            yield probe
        finally:
            probe.close()


@pytest.fixture(scope="module")
def wan22_pipeline(lightning):
    return PusaPipeline.from_preset(WAN22, device="cpu", loras=lightning)


def expert_steps(job: Job) -> list[int]:
    """How many of the job's steps each expert runs (the plan's boundary rule)."""
    plan = replan(job.request, job.plan["seed"], MODELS[job.model])
    experts = [plan.expert(k) for k in range(plan.request.steps)]
    return [experts.count(0), experts.count(1)]


def steps_run(service: ServiceProbe, deployment: str) -> int:
    return sum(s["steps_run"] for s in service.stats(deployment).values())


def job_steps_run(service: ServiceProbe, deployment: str, job_id: str) -> int:
    """The steps of `job_id` the replicas of `deployment` computed (their recent steps), whatever else ran."""
    return sum(1 for s in service.stats(deployment).values() for step in s["recent_steps"] if step["job_id"] == job_id)


def test_the_app_lists_both_models(service):
    assert [m["id"] for m in service.http.get("/v1/models").json()["data"]] == ["pusa-v1", "pusa-wan2.2"]


@pytest.mark.parametrize("request_fields", [T2V, I2V], ids=["t2v", "i2v-fast"])
def test_a_wan22_job_runs_each_step_on_its_experts_deployment(service, wan22_pipeline, request_fields, tmp_path):
    before = {name: steps_run(service, name) for name in ("DiT", "DiTHigh", "DiTLow")}
    started = time.perf_counter()
    job_id, video = service.run(timeout=180, **request_fields)
    print(f"{request_fields['model']} {request_fields.get('mode', 'standard')} job: "
          f"{time.perf_counter() - started:.1f} s through the service")
    job = service.record(job_id)
    assert job.model == "pusa-wan2.2" and service.retrieve(job_id)["model"] == "pusa-wan2.2"
    high, low = expert_steps(job)
    assert high and low  # the job crosses the boundary
    after = {name: steps_run(service, name) for name in ("DiT", "DiTHigh", "DiTLow")}
    assert (after["DiTHigh"] - before["DiTHigh"], after["DiTLow"] - before["DiTLow"]) == (high, low)
    assert after["DiT"] == before["DiT"]  # Pusa V1's DiT ran none of them
    fast = {"lightning": 1.0} if request_fields.get("mode") == "fast" else {}  # mode fast adds the registry's pair
    assert [s["loras"] for s in service.stats("DiTHigh").values()] == [{"pusa": job.request["lora_alpha"], **fast}]
    assert [s["loras"] for s in service.stats("DiTLow").values()] == [{"pusa": job.request["lora_alpha_2"], **fast}]
    assert video == reference_video(service, wan22_pipeline, job_id, tmp_path)


def reference_video(service: ServiceProbe, pipeline: PusaPipeline, job_id: str, folder: Path) -> bytes:
    """The Wan2.2 job's video made in process from its own request and seed (its image from a file)."""
    job = service.record(job_id)
    request = dict(job.request)
    if request.get("images"):
        (folder / "image.png").write_bytes(image_bytes("PNG"))
        request["images"] = [str(folder / "image.png")]
    plan = replan(request, job.plan["seed"], WAN22)
    with one_thread():  # as the service's replicas run
        return pipeline.generate(plan, folder / f"{job_id}.mp4").video_path.read_bytes()


def test_a_pusa_v1_job_on_the_same_app_is_unchanged(service, tiny_pipeline, tmp_path):
    before = {name: steps_run(service, name) for name in ("DiTHigh", "DiTLow")}
    job_id, video = service.run(prompt="a dog", size="64x64", frames=9, steps=3, seed=2)
    assert service.record(job_id).model == "pusa-v1"
    assert {name: steps_run(service, name) for name in ("DiTHigh", "DiTLow")} == before
    assert video == service.reference_video(tiny_pipeline, job_id, tmp_path)


def test_a_wan22_field_on_pusa_v1_or_an_unknown_model_is_refused(service):
    for fields, param in [({"guidance_2": 2.0}, "guidance_2"), ({"model": "pusa-v2"}, "model")]:
        response = service.http.post("/v1/videos", json={"prompt": "a cat", **fields})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param


def test_the_shared_text_encoder_and_vae_are_the_wan22_presets_own(tiny_folder):
    """The app's TextEncoder and VAE load `tiny`; tiny-wan2.2's tokenizer, text encoder and VAE are the same files."""
    wan22 = model_folder(get_preset(WAN22))
    for part in ("tokenizer", "text_encoder", "vae"):
        files = sorted(p.relative_to(tiny_folder) for p in (tiny_folder / part).rglob("*") if p.is_file())
        assert files and files == sorted(p.relative_to(wan22) for p in (wan22 / part).rglob("*") if p.is_file())
        assert all((tiny_folder / f).read_bytes() == (wan22 / f).read_bytes() for f in files), part


def test_a_job_of_a_model_no_longer_served_fails_naming_it(tmp_path):
    """A Wan2.2 job left queued when the app was redeployed without wan22_preset."""
    runner = Runner(tmp_path, (None, None, None, None), models={"pusa-v1": "tiny"})
    job_id = runner.submit({"prompt": "a cat", "steps": 2})
    runner.run("runner-1")
    job = runner.jobs.get(job_id)
    assert job.status == "failed" and job.error["code"] == "model_not_served", job.error
    assert "pusa-wan2.2" in job.error["message"]


def test_a_batch_row_runs_on_the_batchs_model():
    """A batch runs its preset's model: a row naming none runs on it, a row naming the other fails naming
    ``model`` and both models; a file's rows may name one model only."""
    for preset, other in (("tiny", "pusa-wan2.2"), (WAN22, "pusa-v1")):
        spec = get_preset(preset)
        with pytest.raises(InvalidRequest) as refused:
            read_row({"prompt": "a cat", "model": other}, spec, base=None)
        assert refused.value.field == "model"
        assert other in refused.value.reason and spec.model in refused.value.reason
        for fields in ({"prompt": "a cat"}, {"prompt": "a cat", "model": spec.model}):
            plan, _ = read_row(fields, spec, base=None)
            assert plan.experts == spec.experts
    assert batch_model([{"prompt": "a"}, {"prompt": "b", "model": "pusa-wan2.2"}]) == "pusa-wan2.2"
    assert batch_model([{"prompt": "a"}]) == "pusa-v1"
    with pytest.raises(InvalidRequest) as mixed:
        batch_model([{"model": "pusa-v1"}, {"model": "pusa-wan2.2"}])
    assert mixed.value.field == "model"


def wan22_reference(pipeline: PusaPipeline, fields: dict, folder: Path) -> bytes:
    """The video of the request `fields` (with its seed) made in process on tiny-wan2.2."""
    plan = plan_request(parse_request(fields), get_preset(WAN22))
    with one_thread():  # as the batch's actors run
        return pipeline.generate(plan, folder / "reference.mp4").video_path.read_bytes()


WAN22_ROW = {"prompt": "a cat", "width": 64, "height": 64, "frames": 9, "steps": 6, "guidance_2": 2.0,
             "lora_alpha_2": 1.2, "seed": 5}


def test_pusa_batch_runs_a_wan22_preset_end_to_end(service, wan22_pipeline, tmp_path):
    """`pusa batch --preset tiny-wan2.2` (a process of its own, on the service's Ray): a row naming no model
    runs on Pusa-Wan2.2 to the in-process pipeline's video; a row naming pusa-v1 fails naming ``model``."""
    rows = [{"custom_id": "wan", **WAN22_ROW}, {"custom_id": "v1", "model": "pusa-v1", "prompt": "a dog", "steps": 2}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pusa_cli", "batch", str(tmp_path / "m.jsonl"), "--output",
                           str(tmp_path / "out"), "--preset", WAN22, "--json", "--address",
                           ray.get_runtime_context().gcs_address], capture_output=True, text=True, timeout=300)
    print(f"pusa batch: {time.perf_counter() - started:.1f} s")
    assert done.returncode == 1, done.stderr[-2000:]  # one row failed
    summary = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])  # not Ray's notes
    assert (summary["completed_total"], summary["failed_total"]) == (1, 1)
    (error,) = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert error["custom_id"] == "v1" and error["error"]["param"] == "model"
    assert "pusa-wan2.2" in error["error"]["message"] and "pusa-v1" in error["error"]["message"]
    assert (tmp_path / "out" / "videos" / "wan.mp4").read_bytes() == \
        wan22_reference(wan22_pipeline, WAN22_ROW, tmp_path)


def test_an_api_batch_runs_on_the_model_its_rows_name(service, wan22_pipeline, tmp_path):
    """`/v1/batches`: a file whose rows name pusa-wan2.2 (or none) runs on it, each row a pusa-wan2.2 video;
    a file naming both models is refused naming ``model``."""
    client = openai.OpenAI(api_key="unused", base_url=f"{service.url}/v1", max_retries=0)
    wan = {"model": "pusa-wan2.2", "prompt": "a cat", "size": "64x64", "frames": 9, "steps": 6, "guidance_2": 2.0,
           "lora_alpha_2": 1.2, "seed": 5}
    rows = [("wan", wan), ("default", {"prompt": "a dog", "size": "64x64", "frames": 9, "steps": 2, "seed": 6})]
    upload = client.files.create(file=("wan.jsonl", batch_file(rows)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/videos", completion_window="24h")
    deadline = time.monotonic() + 300
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.5)
    assert (batch.status, batch.request_counts.completed) == ("completed", 2), batch
    lines = {(line := json.loads(text))["custom_id"]: line["response"]["body"]
             for text in client.files.content(batch.output_file_id).text.splitlines()}
    assert {cid: body["model"] for cid, body in lines.items()} == {"wan": "pusa-wan2.2", "default": "pusa-wan2.2"}
    assert service.content(lines["wan"]["id"]) == wan22_reference(wan22_pipeline, WAN22_ROW, tmp_path)

    mixed = client.files.create(file=("mixed.jsonl", batch_file([("wan", wan), ("v1", {"model": "pusa-v1",
                                                                                        "prompt": "a dog"})])),
                                purpose="batch")
    refused = service.http.post("/v1/batches", json={"input_file_id": mixed.id, "endpoint": "/v1/videos",
                                                     "completion_window": "24h"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "model", refused.text


def test_an_api_batch_of_a_model_not_served_is_refused_naming_it():
    routes = SimpleNamespace(presets={"pusa-v1": get_preset("tiny")})
    with pytest.raises(ApiError) as refused:
        BatchRoutes._batch_model(routes, [{"custom_id": "a", "model": "pusa-wan2.2", "prompt": "a cat"}])
    assert (refused.value.status, refused.value.param) == (400, "model")
    assert "pusa-wan2.2" in refused.value.message


def test_an_api_batch_of_a_model_no_longer_served_fails():
    """A Wan2.2 batch left waiting when the app was redeployed without wan22_preset: its driver stops."""
    ctx = SimpleNamespace(files=SimpleNamespace(store=None), models={"pusa-v1": "tiny"}, settings=BatchSettings())
    run = BatchRun(ctx, SimpleNamespace(batch=SimpleNamespace(id="batch_x")))
    run.rows = [{"custom_id": "a", "model": "pusa-wan2.2", "prompt": "a cat"}]
    with pytest.raises(ModelNotServed, match="pusa-wan2.2"):
        run.settings
    run.rows = [{"custom_id": "a", "prompt": "a cat"}]
    assert run.settings is ctx.settings


def batch_file(rows: list[tuple[str, dict]]) -> bytes:
    return "".join(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/videos", "body": body}) + "\n"
                   for cid, body in rows).encode()


def test_the_client_sends_its_model_and_an_extension_keeps_the_sources(service, capsys):
    """`pusa client submit --model pusa-wan2.2`, then `pusa client extend ID` naming none: both on Pusa-Wan2.2."""
    common = ["--url", service.url, "--prompt", "a cat", "--steps", "2", "--size", "64x64", "--frames", "17"]
    assert cli_main(["client", "submit", *common, "--model", "pusa-wan2.2", "--guidance-2", "2", "--wait", "--json"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert (job["status"], job["model"]) == ("completed", "pusa-wan2.2")
    assert service.record(job["id"]).request["guidance_2"] == 2.0
    assert cli_main(["client", "extend", job["id"], *common, "--json"]) == 0
    extended = json.loads(capsys.readouterr().out)
    assert extended["model"] == "pusa-wan2.2" and service.record(extended["id"]).extended_from == job["id"]
    assert service.wait_ended(extended["id"], timeout=180).status == "completed"  # no job left to the next test


def test_an_extension_of_a_wan22_video_runs_on_pusa_wan22(service):
    """The extension of a video by id takes the model of the video it continues (unless it names one)."""
    job_id, _ = service.run(**{**T2V, "frames": 17, "steps": 2})  # an extension continues the last 13 frames
    extended = service.http.post("/v1/videos/extensions", json={"video": {"id": job_id}, "prompt": "on", "steps": 2,
                                                                "size": "64x64", "frames": 17, "seed": 1})
    assert extended.status_code == 200, extended.text
    assert extended.json()["model"] == "pusa-wan2.2"
    job = service.wait_ended(extended.json()["id"], timeout=180)
    assert job.status == "completed" and job.model == "pusa-wan2.2" and job.extended_from == job_id, job.error
    named = service.http.post("/v1/videos/extensions", json={"video": job_id, "prompt": "on", "steps": 1,
                                                             "model": "pusa-v1", "size": "64x64", "frames": 17})
    assert named.status_code == 200 and named.json()["model"] == "pusa-v1", named.text
    assert service.wait_ended(named.json()["id"], timeout=180).status == "completed"


@pytest.fixture(scope="module")
def browser(service):
    """Debian's headless Chromium on the page (as tests/test_web.py drives it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from test_web import CHROMEDRIVER, CHROMIUM

    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("Debian's chromium and chromium-driver are missing: run scripts/install.sh")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1360,1200"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
        problems = [entry["message"] for entry in driver.get_log("browser")
                    if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]]
        assert not problems, problems
    finally:
        driver.quit()


def test_the_page_offers_the_served_models_and_wan22s_own_fields(browser, service):
    """The model selector holds `GET /v1/models`; choosing pusa-wan2.2 shows the low-noise expert's guidance
    and LoRA alpha with the model's alphas (1.5, 1.4), and its job runs on pusa-wan2.2 with them; its
    extension from the page too, with pusa-v1 selected by then."""
    from selenium.webdriver.support.ui import Select
    from test_web import css, js, open_tab, set_value, wait

    browser.get(f"{service.url}/")
    wait(browser, lambda d: js(d, "return document.body.dataset.ready") == "true", 60, "the page")
    assert [o.get_attribute("value") for o in Select(css(browser, "#f-model")).options] == ["pusa-v1", "pusa-wan2.2"]
    assert not css(browser, "#f-guidance_2").is_displayed() and not css(browser, "#f-lora_alpha_2").is_displayed()
    assert css(browser, "#f-lora_alpha").get_attribute("value") == "1.4"
    Select(css(browser, "#f-model")).select_by_value("pusa-wan2.2")
    wait(browser, lambda d: css(d, "#f-lora_alpha_2").is_displayed(), 10, "the Wan2.2 fields")
    assert [css(browser, f"#f-{name}").get_attribute("value") for name in ("lora_alpha", "lora_alpha_2", "guidance_2")] \
        == ["1.5", "1.4", ""]
    open_tab(browser, "t2v")
    for selector, value in (("#f-prompt", "a cat"), ("#f-steps", 2), ("#f-guidance_2", 2)):
        set_value(browser, selector, value)
    css(browser, "#submit").click()
    job_id = wait(browser, lambda d: css(d, "#job-id").text, 30, "a job")
    job = service.wait_ended(job_id, timeout=120)
    assert job.status == "completed" and job.model == "pusa-wan2.2", job.error
    assert (job.request["guidance_2"], job.request["lora_alpha"], job.request["lora_alpha_2"]) == (2.0, 1.5, 1.4)
    Select(css(browser, "#f-model")).select_by_value("pusa-v1")  # back: its alpha, no Wan2.2 fields
    wait(browser, lambda d: not css(d, "#f-guidance_2").is_displayed(), 10, "the Wan2.2 fields hidden")
    assert css(browser, "#f-lora_alpha").get_attribute("value") == "1.4"
    # "extend this video" continues it on its own model, with that model's alphas (not pusa-v1's, selected now)
    wait(browser, lambda d: css(d, "#extend").is_displayed(), 30, "the result's extend button")
    css(browser, "#extend").click()
    extended = wait(browser, lambda d: css(d, "#job-id").text not in ("", job_id) and css(d, "#job-id").text, 30,
                    "the extension")
    extension = service.wait_ended(extended, timeout=180)
    assert (extension.model, extension.extended_from, extension.request["lora_alpha"]) == ("pusa-wan2.2", job_id, 1.5)
    assert extension.status == "completed", extension.error


def test_the_estimate_counts_each_experts_guidance_passes(service):
    """Two passes a step where the expert's guidance is above 1, one where it is 1."""
    def cost(**fields) -> float:
        response = service.http.post("/v1/videos/plan", json={**T2V, "size": "832x480", "frames": 81, **fields})
        assert response.status_code == 200, response.text
        return response.json()["cost_gpu_s"]

    plan = plan_request(parse_request({"prompt": "a cat", "steps": T2V["steps"]}), get_preset(WAN22))
    experts = [plan.expert(k) for k in range(plan.request.steps)]
    high, low = experts.count(0), experts.count(1)
    both, one, none = cost(), cost(guidance_2=1.0), cost(guidance=1.0, guidance_2=1.0)
    assert both > one > none
    assert (one - none) / (both - none) == pytest.approx(high / (high + low), rel=1e-2)


def test_a_runner_killed_before_the_experts_switch_is_resumed_to_the_same_video(service, wan22_pipeline, tmp_path):
    """A 1024x1024 frame makes a tiny step take a noticeable time, so the kill lands mid-job; the runner is
    killed once the last high-noise step before the switch is done, and the next one resumes from a
    checkpoint at or after it (the low-noise steps: on DiTLow, whoever runs them)."""
    request = {"model": "pusa-wan2.2", "prompt": "a cat", "size": "1024x1024", "frames": 1, "steps": 12,
               "guidance": 1.0, "seed": 9}
    plan = plan_request(parse_request({"prompt": "a cat", "steps": 12}), get_preset(WAN22))
    experts = [plan.expert(k) for k in range(12)]
    switch = experts.index(1)
    job_id = service.submit(**request)
    service.wait_steps(job_id, switch - 1, timeout=120)
    service.kill_all("Runner")
    job = service.wait_ended(job_id, timeout=120)
    assert job.status == "completed", job.error
    assert job.takeovers == 1
    events = service.events(job_id)
    (requeued,) = [e for e in events if e["type"] == "queued" and e.get("requeued")]
    print(f"killed after step {switch - 1} of the high-noise expert's {switch}; "
          f"resumed at step {requeued['resume_step']}")
    assert requeued["resume_step"] >= switch - 1
    assert [e["step"] for e in events if e["type"] == "step"] == list(range(1, 13))  # each step once
    service.wait_ready()
    ran = {name: job_steps_run(service, name, job_id) for name in ("DiTHigh", "DiTLow")}
    assert experts.count(0) <= ran["DiTHigh"] <= experts.count(0) + 1  # at most the step in flight ran twice
    assert experts.count(1) <= ran["DiTLow"] <= experts.count(1) + 1
    assert service.content(job_id) == reference_video(service, wan22_pipeline, job_id, tmp_path)


# -- a runner killed at the experts' switch, in process ------------------------------------------------------


class Runner:
    """A runner's context over the service's own stage classes in this process, serving both models."""

    def __init__(self, folder: Path, replicas: tuple, models: dict[str, str] = MODELS) -> None:
        self.jobs = JobStore(open_database(f"sqlite:///{folder}/jobs.db"), lease_ttl_s=1.0)
        self.files = JobFiles(open_store(str(folder / "store")))
        self.dit_before = None
        text, dit, high, low = replicas
        vae = VAE.func_or_class(store=str(folder / "store"))
        before = lambda name, args: self.dit_before and self.dit_before(name, args)  # noqa: E731
        stages = Stages(LocalHandle(text), LocalHandle(vae), LocalHandle(dit),
                        StageSettings(retries=1, backoff_s=0.01),
                        experts=(LocalHandle(high, before), LocalHandle(low, before)))
        self.ctx = RunContext(jobs=self.jobs, files=self.files, stages=stages, settings=RunnerSettings(),
                              preset="tiny", retention_s=3600, webhook_url=None, draining=asyncio.Event(),
                              models=models)

    def submit(self, request: dict) -> str:
        plan = plan_request(parse_request(request), get_preset(WAN22))
        job_id = new_job_id(time.time())
        self.jobs.create(Job(id=job_id, created_at=job_created_at(job_id), model="pusa-wan2.2",
                             request=plan.request.model_dump(), plan=job_plan(plan)), {"type": "queued"})
        return job_id

    def run(self, holder: str) -> None:
        asyncio.run(JobRun(self.ctx, self.jobs.claim(holder)).run())


class Killed(BaseException):
    """The runner's process ends here: nothing more of the job is written."""


def test_a_runner_killed_at_the_experts_switch_is_resumed_to_the_same_video(service, wan22_pipeline, tmp_path):
    request = {"prompt": "a cat", "width": 64, "height": 64, "frames": 9, "steps": 6, "seed": 8}
    plan = plan_request(parse_request(request), get_preset(WAN22))
    switch = [plan.expert(k) for k in range(6)].index(1)  # the low-noise expert's first step
    replicas = (TextEncoder.func_or_class(), DiT.func_or_class(),
                DiT.func_or_class(preset=WAN22, expert=0), DiT.func_or_class(preset=WAN22, expert=1))
    runner = Runner(tmp_path, replicas)
    job_id = runner.submit(request)
    calls = []

    def kill_at_the_switch(name: str, args: tuple) -> None:
        if name == "step":
            calls.append(args[0].expert)
            if args[0].step == switch and len(calls) == switch + 1:
                raise Killed

    runner.dit_before = kill_at_the_switch
    with pytest.raises(Killed):
        with one_thread():
            runner.run("runner-1")
    killed = runner.jobs.get(job_id)
    assert (killed.lease_holder, killed.checkpoint_step) == ("runner-1", switch)
    time.sleep(1.1)  # its lease expires
    with one_thread():
        runner.run("runner-2")  # adopts the job from its checkpoint
    job = runner.jobs.get(job_id)
    assert job.status == "completed", job.error
    assert job.takeovers == 1
    assert calls == [0] * switch + [1] + [1] * (6 - switch)  # the killed step ran again, on the low-noise expert
    with one_thread():
        reference = wan22_pipeline.generate(plan, tmp_path / "ref.mp4").video_path.read_bytes()
    assert runner.files.store.get(runner.files.result_key(job_id, "video")) == reference
