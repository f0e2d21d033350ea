"""`pusa batch` on Ray Data (tiny preset, CPU, a real local Ray, a real S3 server): a mixed manifest of
every task with media from S3 and data URLs and bad rows, end to end to `s3://`; byte-identity with the
HTTP API; resume after the batch is killed mid-run; a DiT actor killed mid-batch. OpenAI's Files and Batch
APIs on the service: a batch to its output file, cancelled, refused inputs, its runner killed, its runner
drained by a redeploy (the last test: it changes the service)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve.schema import ServeDeploySchema
from s3server import s3_server_fixture
from service_probe import ServiceProbe
from videoapi import image_bytes, mp4_bytes, wait_done

from deployments.launch import deploy
from pusa_batch.run import BatchSettings, run_batch
from pusa_batch.sources import read_manifest
from pusa_jobs.batches import BatchStore
from pusa_jobs.db import open_database
from serving import default_database, free_port, local_config, new_version, running_service

BUCKET = "pusa-batch"


s3 = s3_server_fixture(scope="module")


RUNNER = {"lease_ttl_s": 10, "renew_s": 2, "drain_wait_s": 120}  # a lost runner's batch moves on soon
DEPLOYMENTS = {"Runner": {"graceful_shutdown_timeout_s": 150}}  # Serve waits for a drain to end


@pytest.fixture(scope="module")
def metrics_port() -> int:
    """Where the local Ray's metrics agent serves Prometheus metrics (picked when the service starts)."""
    return free_port()


@pytest.fixture(scope="module")
def service_store(tmp_path_factory) -> str:
    """The service's store (a folder); its job database is a SQLite file beside it."""
    return str(tmp_path_factory.mktemp("svc") / "store")


@pytest.fixture(scope="module")
def service(s3, metrics_port, service_store):
    """The HTTP service (for byte-identity) on the same local Ray the batches run on."""
    env = s3.service_env()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        with running_service(service_store, env=env, metrics_port=metrics_port, runner=RUNNER,
                             deployments=DEPLOYMENTS) as url:
            ray.data.DataContext.get_current().enable_progress_bars = False
            yield url


def put(s3, key: str, data: bytes) -> str:
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=data)
    return f"s3://{BUCKET}/{key}"


def get(s3, key: str) -> bytes:
    return s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()


def keys(s3, prefix: str) -> list[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_mixed_manifest_of_every_task_to_s3(service, s3, metrics_port):
    s3.client().create_bucket(Bucket=BUCKET)
    start = put(s3, "media/start.png", image_bytes("PNG", seed=1))
    clip = put(s3, "media/clip.mp4", mp4_bytes(frames=17, seed=2))
    rows = [
        {"custom_id": "t2v-1", "prompt": "a cat", "steps": 2, "seed": 1},
        {"custom_id": "i2v-1", "prompt": "pan", "input_reference": start, "steps": 2, "seed": 2, "lora_alpha": 1.0},
        {"custom_id": "kf-1", "task": "multi_frame", "prompt": "day to night", "steps": 2, "seed": 3,
         "images": [data_url(image_bytes("PNG", seed=4)), data_url(image_bytes("JPEG", seed=5), "image/jpeg")],
         "positions": [0, 4], "multipliers": [0.2, 0.5]},
        {"custom_id": "v2v-1", "task": "v2v", "prompt": "on", "video": clip, "positions": [0, 1], "steps": 2,
         "seed": 6, "size": "64x64", "seconds": 0.6},
        {"custom_id": "no-prompt", "steps": 2},
        {"custom_id": "missing-media", "prompt": "p", "input_reference": f"s3://{BUCKET}/media/none.png"},
        {"custom_id": "bad-steps", "prompt": "p", "steps": 99},
        {"custom_id": "bad id!", "prompt": "p"},
        {"custom_id": "t2v-1", "prompt": "again"},
        {"prompt": "no id"},
    ]
    manifest = put(s3, "in/mixed.jsonl", jsonl(rows))
    summary = run_batch(manifest, f"s3://{BUCKET}/out/mixed", BatchSettings(), progress=False)
    assert (summary["completed_total"], summary["failed_total"], summary["state"]) == (4, 6, "done")

    output = [json.loads(line) for line in get(s3, "out/mixed/output.jsonl").decode().splitlines()]
    assert [r["custom_id"] for r in output] == [r.get("custom_id") for r in rows]  # manifest order
    for record in output[:4]:
        assert record["status"] == "completed" and record["error"] is None, record
        assert record["video"] == f"s3://{BUCKET}/out/mixed/videos/{record['custom_id']}.mp4"
        assert get(s3, record["video"].split(f"{BUCKET}/", 1)[1])[4:8] == b"ftyp"
        assert get(s3, record["thumbnail"].split(f"{BUCKET}/", 1)[1])[8:12] == b"WEBP"
        assert {"prepare", "conditioning", "text", "denoise", "decode"} <= set(record["timings_s"])
    assert output[0]["seed"] == 1
    errors = {(r["custom_id"], r["error"]["param"]) for r in
              (json.loads(line) for line in get(s3, "out/mixed/errors.jsonl").decode().splitlines())}
    assert errors == {("no-prompt", "prompt"), ("missing-media", "input_reference"), ("bad-steps", "steps"),
                      ("bad id!", "custom_id"), ("t2v-1", "custom_id"), (None, "custom_id")}
    status = json.loads(get(s3, "out/mixed/status.json"))
    assert status["state"] == "done" and status["total"] == 10 and status["completed_total"] == 4
    assert len(keys(s3, "out/mixed/videos/")) == 4

    rows_ended = {}  # the driver's counter, on Ray's Prometheus endpoint
    deadline = time.monotonic() + 30
    while len(rows_ended) < 2 and time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        rows_ended = {s.labels["status"]: s.value for family in text_string_to_metric_families(text)
                      for s in family.samples if s.name == "ray_pusa_batch_rows_total"
                      and s.labels["batch"] == f"s3://{BUCKET}/out/mixed"}
        time.sleep(1)
    assert rows_ended == {"completed": 4, "failed": 6}


def test_manifest_formats_read_alike(tmp_path):
    rows = [{"custom_id": "a", "prompt": "p", "steps": 2, "positions": "0,4"}, {"custom_id": "b", "prompt": "q"}]
    (tmp_path / "m.jsonl").write_bytes(jsonl(rows))
    (tmp_path / "m.csv").write_text("custom_id,prompt,steps,positions\na,p,2,\"0,4\"\nb,q,,\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    read = {fmt: read_manifest(str(tmp_path / f"m.{fmt}")) for fmt in ("jsonl", "csv", "parquet")}
    assert [r["custom_id"] for r in read["csv"]] == ["a", "b"] and "steps" not in read["csv"][1]
    assert read["parquet"] == read["jsonl"]
    assert {k: str(v) for k, v in read["jsonl"][0].items()} == read["csv"][0]
    with pytest.raises(ValueError, match="expected one of"):
        read_manifest(str(tmp_path / "m.txt"))


def test_a_row_is_byte_identical_to_the_http_api(service, s3, tmp_path):
    image = image_bytes("PNG", seed=9)
    requests = {"same": {"prompt": "a boat", "steps": 3, "seed": 42, "noise_multiplier": 0.3},
                "long": {"prompt": "a boat", "steps": 2, "seed": 43, "frames": 25, "window_frames": 17}}  # 3 windows
    online = {}
    for custom_id, request in requests.items():
        r = httpx.post(f"{service}/v1/videos", files={"input_reference": ("a.png", image, "image/png")},
                       data={k: str(v) for k, v in request.items()}, timeout=30)
        assert r.status_code == 200, r.text
        assert wait_done(service, r.json()["id"])["status"] == "completed"
        online[custom_id] = httpx.get(f"{service}/v1/videos/{r.json()['id']}/content", timeout=30).content
    (tmp_path / "a.png").write_bytes(image)
    (tmp_path / "m.jsonl").write_bytes(jsonl([{"custom_id": custom_id, "input_reference": "a.png", **request}
                                              for custom_id, request in requests.items()]))
    summary = run_batch(str(tmp_path / "m.jsonl"), str(tmp_path / "out"), BatchSettings(), progress=False)
    assert summary["completed_total"] == 2
    for custom_id in requests:
        assert (tmp_path / "out" / "videos" / f"{custom_id}.mp4").read_bytes() == online[custom_id]


def _many(n: int, **fields) -> bytes:
    return jsonl([{"custom_id": f"row-{i:03d}", "prompt": f"scene {i % 3}", "seed": i, "lora_alpha": [1.0, 1.4][i % 2],
                   **fields} for i in range(n)])


def test_a_killed_batch_resumes_without_duplicates(service, s3, tmp_path):
    manifest = put(s3, "in/resume.jsonl", _many(10, steps=2, size="64x64"))  # small rows: resuming is the point
    output = f"s3://{BUCKET}/out/resume"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "pusa_cli", "batch", manifest, "--output", output, "--json"]
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    while len(keys(s3, "out/resume/rows/")) < 3:  # some rows done, others in flight
        assert run.poll() is None and time.monotonic() < deadline, run.stderr.read()
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    done_before = set(keys(s3, "out/resume/rows/"))
    assert 3 <= len(done_before) < 10

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == len(done_before) and summary["completed"] == 10 - len(done_before)
    output_rows = [json.loads(line) for line in get(s3, "out/resume/output.jsonl").decode().splitlines()]
    assert sorted(r["custom_id"] for r in output_rows) == [f"row-{i:03d}" for i in range(10)]  # each once
    assert len(keys(s3, "out/resume/videos/")) == 10 and len(keys(s3, "out/resume/thumbnails/")) == 10


def _own_ray_processes() -> list[tuple[psutil.Process, str]]:
    """The processes of this test process's local Ray (its descendants), with their titles: never those of
    another Ray on the machine (another test process, another checkout)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            found.append((proc, " ".join(proc.cmdline()).strip()))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _dit_actor(busy: bool) -> psutil.Process | None:
    """The Denoising actor's process (Ray titles it by the task it runs: `.submit` while on a row)."""
    for proc, title in _own_ray_processes():
        if "MapBatches(Denoising)" in title and (not busy or title.endswith(".submit")):
            return proc
    return None


def test_a_dit_actor_killed_mid_batch_costs_no_row(service, tmp_path):
    (tmp_path / "m.jsonl").write_bytes(_many(4, steps=40, size="768x768", frames=1))  # denoising dominates
    records: list[dict] = []
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_batch(
        str(tmp_path / "m.jsonl"), str(tmp_path / "out"), BatchSettings(nice=5), progress=False,
        on_record=records.append)))
    thread.start()
    deadline = time.monotonic() + 300
    while (victim := _dit_actor(busy=True)) is None:  # the actor on a row (how many went through is timing)
        assert time.monotonic() < deadline and thread.is_alive(), records
        time.sleep(0.05)
    worker = next(p for p, title in _own_ray_processes() if "ServeReplica:pusa:DiT" in title)
    assert victim.nice() == min(19, worker.nice() + 5)  # the stage actors: 5 below Ray's workers (15 by default)
    victim.kill()
    thread.join(timeout=300)
    assert result["completed_total"] == 4 and result["failed_total"] == 0, result
    assert sorted(p.name for p in (tmp_path / "out" / "videos").iterdir()) == [f"row-{i:03d}.mp4" for i in range(4)]
    assert len({r["custom_id"] for r in records}) == len(records) == 4  # no row twice
    assert not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE


# -- OpenAI's Files and Batch APIs on the service ------------------------------------------------------


def _requests(rows: list[dict]) -> bytes:
    return jsonl([{"custom_id": cid, "method": "POST", "url": "/v1/videos", "body": body} for cid, body in rows])


def _batch_done(client: openai.OpenAI, batch_id: str, timeout: float = 300) -> openai.types.Batch:
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.5)
    return batch


def test_the_openai_client_runs_a_batch_to_its_output_file(service):
    client = openai.OpenAI(api_key="unused", base_url=f"{service}/v1", max_retries=0)
    image = image_bytes("PNG", seed=9)
    same = {"prompt": "a boat", "steps": 3, "seed": 42, "noise_multiplier": 0.3}
    online = httpx.post(f"{service}/v1/videos", files={"input_reference": ("a.png", image, "image/png")},
                        data={k: str(v) for k, v in same.items()}, timeout=30).json()
    upload = client.files.create(file=("requests.jsonl", _requests([
        ("t2v", {"prompt": "a cat", "steps": 2, "seed": 1, "size": "64x64"}),
        ("i2v", {**same, "input_reference": data_url(image)}),
        ("bad-steps", {"prompt": "p", "steps": 99}),
    ])), purpose="batch")
    assert (upload.purpose, upload.status, upload.object) == ("batch", "processed", "file")
    assert upload.expires_at == upload.created_at + 7 * 86400  # the service's retention (a week), then swept
    created = client.batches.create(input_file_id=upload.id, endpoint="/v1/videos", completion_window="24h",
                                    metadata={"run": "nightly"})
    assert created.status == "validating" and created.request_counts.total == 3
    assert created.pusa["cost_gpu_s"] > 0

    batch = _batch_done(client, created.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 1)
    assert batch.metadata == {"run": "nightly"} and batch.in_progress_at and batch.finalizing_at
    lines = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert [line["custom_id"] for line in lines] == ["t2v", "i2v"]
    videos = {line["custom_id"]: line["response"]["body"] for line in lines}
    assert all(line["response"]["status_code"] == 200 for line in lines)
    assert videos["t2v"]["status"] == "completed" and videos["t2v"]["size"] == "64x64"
    assert client.videos.retrieve(videos["i2v"]["id"]).pusa["seed"] == 42  # each row is a video of the key
    assert wait_done(service, online["id"])["status"] == "completed"
    assert client.videos.download_content(videos["i2v"]["id"]).read() == \
        httpx.get(f"{service}/v1/videos/{online['id']}/content", timeout=30).content  # the same model, byte for byte
    errors = [json.loads(line) for line in client.files.content(batch.error_file_id).text.splitlines()]
    assert [(e["custom_id"], e["response"]["status_code"], e["response"]["body"]["error"]["param"])
            for e in errors] == [("bad-steps", 400, "steps")]
    output = client.files.retrieve(batch.output_file_id)
    assert output.purpose == "batch_output" and output.expires_at >= batch.completed_at + 7 * 86400 - 1
    assert created.id in [b.id for b in client.batches.list(limit=5)]


def test_a_running_batch_is_cancelled_with_its_finished_rows(service):
    client = openai.OpenAI(api_key="unused", base_url=f"{service}/v1", max_retries=0)
    rows = [(f"row-{i}", {"prompt": f"scene {i}", "steps": 8, "seed": i, "size": "256x256"}) for i in range(8)]
    upload = client.files.create(file=("many.jsonl", _requests(rows)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/videos", completion_window="24h")
    deadline = time.monotonic() + 180
    while (batch := client.batches.retrieve(batch.id)).request_counts.completed < 1:
        assert batch.status in ("validating", "in_progress") and time.monotonic() < deadline, batch
        time.sleep(0.2)
    assert client.batches.cancel(batch.id).status == "cancelling"
    batch = _batch_done(client, batch.id, timeout=120)
    assert batch.status == "cancelled" and batch.cancelled_at and batch.cancelling_at
    done = batch.request_counts.completed
    assert 1 <= done < 8
    output = [json.loads(line)["custom_id"] for line in client.files.content(batch.output_file_id).text.splitlines()]
    undone = [json.loads(line) for line in client.files.content(batch.error_file_id).text.splitlines()]
    assert len(output) == done and sorted(output + [e["custom_id"] for e in undone]) == [cid for cid, _ in rows]
    assert {e["error"]["code"] for e in undone} == {"batch_cancelled"}
    time.sleep(2)
    assert client.batches.retrieve(batch.id).request_counts.completed == done  # nothing runs on after the end


@pytest.mark.parametrize("lines, message", [
    ([{"custom_id": "a", "method": "POST", "url": "/v1/videos", "body": {"prompt": "p", "input_reference": "/etc/passwd"}}],
     "line 1: body.input_reference: expected a data URL"),
    ([{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}], "line 1: url: must be /v1/videos"),
    ([{"custom_id": "a", "method": "POST", "url": "/v1/videos", "body": {"prompt": "p"}}] * 2,
     "line 2: custom_id 'a' repeats line 1"),
])
def test_a_bad_input_file_is_refused_naming_its_line(service, lines, message):
    r = httpx.post(f"{service}/v1/files", data={"purpose": "batch"},
                   files={"file": ("in.jsonl", jsonl(lines), "application/jsonl")}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "file", r.text
    assert message in r.json()["error"]["message"]


def test_a_batch_outlives_its_runner(service):
    client = openai.OpenAI(api_key="unused", base_url=f"{service}/v1", max_retries=0)
    rows = [(f"row-{i}", {"prompt": f"scene {i}", "steps": 6, "seed": i, "size": "128x128"}) for i in range(4)]
    batch = client.batches.create(input_file_id=client.files.create(file=("r.jsonl", _requests(rows)), purpose="batch").id,
                                  endpoint="/v1/videos", completion_window="24h")
    deadline = time.monotonic() + 180
    while (batch := client.batches.retrieve(batch.id)).request_counts.completed < 1:
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    for _, runner in ServiceProbe.replicas("Runner"):  # its Ray Data pipeline dies with it
        ray.kill(runner, no_restart=False)
    batch = _batch_done(client, batch.id, timeout=300)  # another runner claims it once the lease expires
    assert batch.status == "completed" and (batch.request_counts.completed, batch.request_counts.failed) == (4, 0)
    lines = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert [line["custom_id"] for line in lines] == [cid for cid, _ in rows]
    video_ids = {line["response"]["body"]["id"] for line in lines}
    assert len(video_ids) == 4 and all(client.videos.retrieve(v).status == "completed" for v in video_ids)


def test_readme_batch_example(service, tmp_path):
    """The README's batch block, run as a script against this service."""
    blocks = re.findall(r"```python\n(.*?)```", (Path(__file__).parent.parent / "README.md").read_text(), re.DOTALL)
    script = next(block for block in blocks if "client.batches.create" in block)
    res = subprocess.run([sys.executable, "-c", script.replace("http://127.0.0.1:8000", service)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    printed = [line.split() for line in res.stdout.splitlines()]
    assert [(p[0], p[2]) for p in printed] == [(f"cat-{i}", "completed") for i in range(3)] and \
        all(p[1].startswith("video_") for p in printed)


def _descendant(title: str) -> psutil.Process | None:
    """A process of this test's Ray (started by this process, unlike another session's) titled `title`."""
    for proc in psutil.Process().children(recursive=True):
        try:
            if title in " ".join(proc.cmdline()):
                return proc
        except psutil.Error:
            continue
    return None


def _replicas_stopping(deployment: str) -> int:
    app = serve.status().applications.get("pusa")
    dep = app.deployments.get(deployment) if app else None  # none while the new version is being built
    return dep.replica_states.get("STOPPING", 0) if dep else 0


def test_a_drained_runner_hands_its_batch_over(service, service_store):
    """A redeploy replaces the runner mid-batch: Serve stops the old replica, which drains (its batch stops
    at the next row's end and is released, not left to lapse), and the new replica claims the batch and
    completes it from the rows done: every row once in the output file, each its own video. The batch's
    decoding actor is paused (SIGSTOP) from its first row's end until the old runner is stopping, so the
    drain lands mid-batch however fast the rows run."""
    client = openai.OpenAI(api_key="unused", base_url=f"{service}/v1", max_retries=0)
    rows = [(f"row-{i}", {"prompt": f"scene {i}", "steps": 2, "seed": i, "size": "64x64"}) for i in range(6)]
    batch = client.batches.create(input_file_id=client.files.create(file=("r.jsonl", _requests(rows)), purpose="batch").id,
                                  endpoint="/v1/videos", completion_window="24h")
    db = open_database(default_database(service_store))
    decoder = None
    try:
        deadline = time.monotonic() + 240
        while (batch := client.batches.retrieve(batch.id)).request_counts.completed < 1:
            assert batch.status in ("validating", "in_progress") and time.monotonic() < deadline, batch
            time.sleep(0.2)
        decoder = _descendant("MapBatches(Decoding)")
        decoder.suspend()  # no row ends until the old runner drains
        first = BatchStore(db).get(batch.id)
        runner = serve.get_deployment_handle("Runner", app_name="pusa")
        old = runner.stats.remote().result(timeout_s=60)
        assert (first.lease_epoch, first.lease_holder, old["batch"]) == (1, old["holder"], batch.id), (first, old)

        port = int(service.rsplit(":", 1)[1])  # a new version of the runner: Serve replaces its replica
        config = local_config(service_store, port, runner=RUNNER, deployments=DEPLOYMENTS)
        new_version(config["applications"][0], "Runner", "2")
        problems: list = []
        redeploy = threading.Thread(target=lambda: problems.extend(deploy(ServeDeploySchema.model_validate(config), 300)))
        redeploy.start()
        deadline = time.monotonic() + 240
        while not _replicas_stopping("Runner"):
            assert time.monotonic() < deadline and redeploy.is_alive(), "the old runner was not stopped"
            time.sleep(0.1)
        decoder.resume()
        redeploy.join(timeout=300)
        assert not redeploy.is_alive() and not problems, problems
        batch = _batch_done(client, batch.id, timeout=300)
        handed = BatchStore(db).get(batch.id)
    finally:
        if decoder is not None and decoder.is_running() and decoder.status() == psutil.STATUS_STOPPED:
            decoder.resume()
        db.dispose()
    assert runner.stats.remote().result(timeout_s=60)["holder"] != old["holder"]  # another replica now
    assert batch.status == "completed" and (batch.request_counts.completed, batch.request_counts.failed) == (6, 0)
    # epochs: 1 claimed by the old runner, 2 released by its drain, 3 claimed by the new one (a lease left to
    # lapse would have gone from 1 to 2)
    assert handed.lease_epoch == 3 and first.completed < 6, (first, handed)
    lines = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert [line["custom_id"] for line in lines] == [cid for cid, _ in rows]
    video_ids = [line["response"]["body"]["id"] for line in lines]
    assert len(set(video_ids)) == 6 and all(client.videos.retrieve(v).status == "completed" for v in video_ids)
    assert sorted(v.id for v in client.videos.list(limit=100) if v.id in video_ids) == sorted(video_ids)


def test_the_driver_fails_rows_without_a_usable_custom_id_before_any_stage():
    """No, a malformed or a repeated custom_id: the row's record is failed at once, naming custom_id; the
    others get their ids."""
    from pusa_batch.run import _checked_ids

    ids, errors = _checked_ids([{"custom_id": "a"}, {}, {"custom_id": "b c"}, {"custom_id": "a"}, {"custom_id": 7}])
    assert ids == ["a", None, "b c", "a", "7"]
    assert sorted(errors) == [1, 2, 3]
    assert all(e["status"] == "failed" and e["error"]["param"] == "custom_id" for e in errors.values())
    assert "repeats the custom_id of row 1" in errors[3]["error"]["message"]
