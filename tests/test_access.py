"""Who may do what, on the local profile with API keys on (a real local Ray, the SQLite job database):
keys made by `pusa-admin`, 401s in OpenAI's shape, two users who cannot see each other's jobs on any
route, an admin who sees all, each quota tripping with 429 and recovering, and the cost limit."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import openai
import pytest
import ray
from sqlalchemy import update
from service_probe import ServiceProbe
from videoapi import mp4_bytes, sse

from deployments.admission import check_exposure, proxy_host
from pusa_jobs.api_keys import KeyStore, Quotas
from pusa_jobs.cost import CALIBRATIONS, estimate_gpu_seconds
from pusa_jobs.db import open_database
from pusa_jobs.schema import usage
from pusa_jobs.webhooks import receiver_problem
from pusa_model.presets import get_preset
from pusa_model.request import parse_request, plan_request
from serving import running_service

MAX_GPU_SECONDS = 60.0
SMALL = {"prompt": "a cat", "steps": 2}
SLOW = {"prompt": "a cat", "size": "1024x1024", "frames": 1, "steps": 40}  # DiT steps of ~0.3 s here


WEBHOOK_SECRET = "whsec_" + "cHVzYS10ZXN0LXdlYmhvb2stc2VjcmV0LTAxMjM0NTY3"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    folder = tmp_path_factory.mktemp("access")
    database = f"sqlite:///{folder / 'jobs.db'}"
    api = {"auth": "keys", "cost": {"max_gpu_seconds": MAX_GPU_SECONDS}}
    with running_service(str(folder / "store"), api=api, database=database,
                         env={"PUSA_WEBHOOK_SECRET": WEBHOOK_SECRET}) as url:
        yield url, database


@pytest.fixture(scope="module")
def keys(service):
    return KeyStore(open_database(service[1]))


def client(url: str, key: str | None) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {key}"} if key else {})


def new_key(keys: KeyStore, role: str = "user", **quotas) -> str:
    _, secret = keys.create(f"test-{role}", role, Quotas(**quotas))
    return secret


def wait_ended(http: httpx.Client, video_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (job := http.get(f"/v1/videos/{video_id}").json())["status"] in ("queued", "in_progress"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    return job


def admin_cli(database: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deployments.admin", "--database", database, *args],
                          capture_output=True, text=True, timeout=60)


def test_keys_made_listed_and_revoked_with_pusa_admin(service):
    url, database = service
    made = admin_cli(database, "keys", "create", "--name", "ci-user", "--jobs-per-minute", "50")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("pusa-") and len(secret) > 40 and "\n" not in secret
    key_id = made.stderr.split()[1]
    listed = admin_cli(database, "keys", "list")
    row = next(line for line in listed.stdout.splitlines() if line.startswith(key_id))
    assert "ci-user\tuser" in row and "active" in row and "jobs_per_minute=50" in row
    assert secret not in listed.stdout and secret[5:] not in listed.stdout  # never shown again

    with client(url, secret) as http:
        assert http.get("/v1/models").status_code == 200
        assert admin_cli(database, "keys", "revoke", key_id).returncode == 0
        refused = http.get("/v1/models")  # at once: every request looks the key up
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert "revoked" in next(line for line in admin_cli(database, "keys", "list").stdout.splitlines()
                             if line.startswith(key_id))
    again = admin_cli(database, "keys", "revoke", key_id)
    assert again.returncode == 1 and again.stderr.strip() == f"pusa-admin: no active key {key_id}"
    bad = admin_cli(database, "keys", "create", "--name", "x", "--max-concurrent-jobs", "0")
    assert bad.returncode == 2 and bad.stderr.startswith("pusa-admin: max_concurrent_jobs:")


ROUTES = [("GET", "/v1/models"), ("GET", "/v1/videos"), ("POST", "/v1/videos"), ("POST", "/v1/videos/stream"),
          ("POST", "/v1/videos/extensions"), ("GET", "/v1/videos/video_01a22b58800f946c116288b4"),
          ("GET", "/v1/videos/video_01a22b58800f946c116288b4/content"),
          ("GET", "/v1/videos/video_01a22b58800f946c116288b4/events"),
          ("POST", "/v1/videos/video_01a22b58800f946c116288b4/cancel"),
          ("DELETE", "/v1/videos/video_01a22b58800f946c116288b4")]


@pytest.mark.parametrize("header", [None, "Bearer pusa-not-a-key", "Bearer", "Basic dXNlcjpwYXNz", "pusa-raw"])
def test_every_route_wants_a_valid_key(service, header):
    url, _ = service
    headers = {} if header is None else {"Authorization": header}
    for method, path in ROUTES:
        r = httpx.request(method, f"{url}{path}", headers=headers, json=SMALL, timeout=30)
        assert r.status_code == 401, (method, path, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key", error
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{url}/health", timeout=30).json()["auth"] == "keys"  # probes need no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="pusa-wrong", base_url=f"{url}/v1", max_retries=0).videos.list()


def test_users_see_only_their_own_jobs_and_admins_see_all(service, keys, tmp_path):
    url, _ = service
    alice, bob, root = client(url, new_key(keys)), client(url, new_key(keys)), client(url, new_key(keys, "admin"))
    mine = alice.post("/v1/videos", json={**SMALL, "seed": 1}, headers={"Idempotency-Key": "k1"}).json()
    assert wait_ended(alice, mine["id"])["status"] == "completed"
    theirs = bob.post("/v1/videos", json={**SMALL, "seed": 2}, headers={"Idempotency-Key": "k1"}).json()
    assert theirs["id"] != mine["id"]  # idempotency keys are per API key
    vid = mine["id"]

    for method, path, kwargs in [
        ("GET", f"/v1/videos/{vid}", {}), ("GET", f"/v1/videos/{vid}/content", {}),
        ("GET", f"/v1/videos/{vid}/content?variant=thumbnail", {}), ("GET", f"/v1/videos/{vid}/events", {}),
        ("POST", f"/v1/videos/{vid}/cancel", {}), ("DELETE", f"/v1/videos/{vid}", {}),
        ("POST", "/v1/videos/extensions", {"json": {"prompt": "on", "video": vid, "steps": 1}}),
        ("POST", "/v1/videos", {"json": {"prompt": "on", "task": "v2v", "video": {"id": vid}, "steps": 1}}),
    ]:
        r = bob.request(method, path, **kwargs)
        assert r.status_code == 404, (method, path, r.text)  # like a job that does not exist
        assert r.json()["error"]["message"] == f"no video with id {vid!r}"
        missing = bob.request(method, path.replace(vid, vid[:-1] + ("0" if vid[-1] != "0" else "1")), **kwargs)
        assert missing.status_code == 404 and missing.json()["error"]["type"] == r.json()["error"]["type"]
    assert vid not in {v["id"] for v in bob.get("/v1/videos", params={"limit": 100}).json()["data"]}
    assert {v["id"] for v in alice.get("/v1/videos", params={"limit": 100}).json()["data"]} == {vid}
    assert {vid, theirs["id"]} <= {v["id"] for v in root.get("/v1/videos", params={"limit": 100}).json()["data"]}

    # the owner, and an admin, may do all of it
    with alice.stream("GET", f"/v1/videos/{vid}/events") as stream:
        assert [e["event"] for e in sse(stream) if "id" in e][-1] == "completed"
    assert alice.get(f"/v1/videos/{vid}/content").content[4:8] == b"ftyp"
    extended = alice.post("/v1/videos/extensions", json={"prompt": "on", "video": vid, "steps": 1})
    assert extended.status_code == 200 and extended.json()["pusa"]["extended_from"] == vid
    assert root.get(f"/v1/videos/{extended.json()['id']}").status_code == 200
    assert root.delete(f"/v1/videos/{theirs['id']}").status_code == 200
    assert bob.get(f"/v1/videos/{theirs['id']}").status_code == 404
    # the openai client with a key works as with OpenAI
    sdk = openai.OpenAI(api_key=alice.headers["Authorization"][7:], base_url=f"{url}/v1")
    assert sdk.videos.retrieve(vid).status == "completed"


def test_files_and_batches_belong_to_their_key_and_are_charged(service, keys):
    url, _ = service
    alice, bob, root = client(url, new_key(keys)), client(url, new_key(keys)), client(url, new_key(keys, "admin"))
    lines = json.dumps({"custom_id": "one", "method": "POST", "url": "/v1/videos", "body": {**SMALL, "seed": 5}})
    upload = alice.post("/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", lines.encode())}).json()
    body = {"input_file_id": upload["id"], "endpoint": "/v1/videos", "completion_window": "24h"}
    batch = alice.post("/v1/batches", json=body).json()
    assert batch["status"] == "validating", batch
    for method, path, kwargs in [
        ("GET", f"/v1/files/{upload['id']}", {}), ("GET", f"/v1/files/{upload['id']}/content", {}),
        ("DELETE", f"/v1/files/{upload['id']}", {}), ("POST", "/v1/batches", {"json": body}),
        ("GET", f"/v1/batches/{batch['id']}", {}), ("POST", f"/v1/batches/{batch['id']}/cancel", {}),
    ]:
        r = bob.request(method, path, **kwargs)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found", (method, path, r.text)
    assert bob.get("/v1/files").json()["data"] == [] and bob.get("/v1/batches").json()["data"] == []
    assert batch["id"] in {b["id"] for b in root.get("/v1/batches").json()["data"]}
    deadline = time.monotonic() + 180
    while (batch := alice.get(f"/v1/batches/{batch['id']}").json())["status"] != "completed":
        assert batch["status"] in ("validating", "in_progress", "finalizing") and time.monotonic() < deadline, batch
        time.sleep(0.5)
    line = json.loads(alice.get(f"/v1/files/{batch['output_file_id']}/content").text)
    video_id = line["response"]["body"]["id"]
    assert alice.get(f"/v1/videos/{video_id}").json()["status"] == "completed"
    assert bob.get(f"/v1/videos/{video_id}").status_code == 404  # the batch's videos are its key's

    poor = client(url, new_key(keys, gpu_seconds_per_day=batch["pusa"]["cost_gpu_s"] / 2))
    upload = poor.post("/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", lines.encode())}).json()
    refused = poor.post("/v1/batches", json={**body, "input_file_id": upload["id"]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "input_file_id", refused.text
    assert "daily quota" in refused.json()["error"]["message"]


def test_concurrent_jobs_quota(service, keys):
    url, _ = service
    http = client(url, new_key(keys, max_concurrent_jobs=1))
    running = http.post("/v1/videos", json={**SLOW, "seed": 3}).json()["id"]
    refused = http.post("/v1/videos", json={**SMALL, "seed": 4})
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["param"] == "max_concurrent_jobs" and int(refused.headers["retry-after"]) >= 1
    http.post(f"/v1/videos/{running}/cancel")
    assert wait_ended(http, running)["status"] == "cancelled"
    assert http.post("/v1/videos", json={**SMALL, "seed": 4}).status_code == 200  # room again


def _age_charges(database: str, seconds: float) -> None:
    """Move every charge `seconds` into the past, as if that much time had gone by."""
    with open_database(database).write() as conn:
        conn.execute(update(usage).values(created_at=usage.c.created_at - seconds))


def test_jobs_per_minute_quota(service, keys):
    url, database = service
    http = client(url, new_key(keys, jobs_per_minute=2))
    assert [http.post("/v1/videos", json={**SMALL, "seed": s}).status_code for s in (5, 6)] == [200, 200]
    refused = http.post("/v1/videos", json={**SMALL, "seed": 7})
    assert refused.status_code == 429 and refused.json()["error"]["param"] == "jobs_per_minute"
    assert 55 <= int(refused.headers["retry-after"]) <= 60
    _age_charges(database, 61)
    assert http.post("/v1/videos", json={**SMALL, "seed": 7}).status_code == 200


def test_gpu_seconds_per_day_quota_outlives_deleted_jobs(service, keys):
    url, database = service
    cost = estimate_gpu_seconds(plan_request(parse_request(SMALL), get_preset("tiny")), CALIBRATIONS["cpu"])
    http = client(url, new_key(keys, gpu_seconds_per_day=2.5 * cost))
    first = http.post("/v1/videos", json={**SMALL, "seed": 8}).json()
    assert first["pusa"]["cost_gpu_s"] == pytest.approx(cost, abs=1e-3)  # shown before it runs
    assert http.post("/v1/videos", json={**SMALL, "seed": 9}).status_code == 200
    assert wait_ended(http, first["id"])["status"] == "completed"
    assert http.delete(f"/v1/videos/{first['id']}").status_code == 200  # the charge stays
    refused = http.post("/v1/videos", json={**SMALL, "seed": 10})
    assert refused.status_code == 429 and refused.json()["error"]["param"] == "gpu_seconds_per_day"
    assert 86000 <= int(refused.headers["retry-after"]) <= 86400
    _age_charges(database, 86401)
    assert http.post("/v1/videos", json={**SMALL, "seed": 10}).status_code == 200
    never = http.post("/v1/videos", json={**SMALL, "size": "256x256", "seed": 11})  # alone above the quota
    assert never.status_code == 400 and "daily quota" in never.json()["error"]["message"]


def test_a_request_above_the_maximum_cost_is_400_naming_its_fields(service, keys):
    url, _ = service
    http = client(url, new_key(keys))
    big = {"prompt": "a cat", "size": "1920x1920", "frames": 241, "steps": 50}
    r = http.post("/v1/videos", json=big)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "size" and error["message"].startswith("size, frames, steps")
    assert f"the limit is {MAX_GPU_SECONDS:g}" in error["message"]
    assert http.post("/v1/videos", json={**big, "size": "64x64", "frames": 17, "steps": 2}).status_code == 200
    video = mp4_bytes(frames=9)  # the cost is checked before the upload is decoded
    r = http.post("/v1/videos", files={"video": ("v.mp4", video, "video/mp4")},
                  data={"prompt": "p", "task": "v2v", "size": "1920x1920", "frames": "241", "steps": "50"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "size"


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://localhost/hook", "http://10.1.2.3/hook",
                                 "http://169.254.169.254/latest/meta-data/", "http://[::1]:8000/", "http://[fd00::1]/",
                                 "http://0.0.0.0/", "http://no-such-host.invalid/hook"])
def test_webhooks_to_private_or_unresolvable_hosts_are_refused(service, keys, url):
    r = client(service[0], new_key(keys)).post("/v1/videos", json={**SMALL, "webhook_url": url})
    assert r.status_code == 400 and r.json()["error"]["param"] == "webhook_url", r.text
    assert "not a public address" in r.json()["error"]["message"] or "cannot resolve" in r.json()["error"]["message"]


def test_public_receivers_pass_the_screen():
    assert receiver_problem("https://93.184.216.34/hook") is None  # a literal public address: no lookup
    assert receiver_problem("http://[2606:2800:220:1:248:1893:25c8:1946]:8080/") is None
    assert "100.64.0.1" in receiver_problem("http://100.64.0.1/")  # carrier-grade NAT is not public either


def test_the_router_sees_the_address_its_proxy_listens_on(service):
    """What the Router's start-up rule (keys off only on loopback) is applied to: Serve's real bind."""
    (_, router), *_ = ServiceProbe.replicas("Router")
    assert ray.get(router.__ray_call__.remote(lambda self: proxy_host()), timeout=30) == "127.0.0.1"
    check_exposure("none", "127.0.0.1")
    for host in ("0.0.0.0", "::", "10.0.0.5", "pusa.example.com"):
        with pytest.raises(ValueError, match=f"listens on {host}"):
            check_exposure("none", host)
    check_exposure("keys", "0.0.0.0")


def test_a_webhook_is_sent_to_the_address_that_was_checked(tmp_path, monkeypatch):
    """DNS rebinding: the receiver's name resolves to a public address when checked and to loopback on a
    second lookup. The attempt is made to the checked address (the name kept in Host and as the TLS name),
    with one lookup per attempt; a name that resolves to a private address at the attempt is not called."""
    import asyncio
    import socket

    import httpx
    from sqlalchemy import insert, select

    from pusa_jobs.db import open_database
    from pusa_jobs.schema import webhook_deliveries
    from pusa_jobs.webhooks import WebhookSender, WebhookSettings, delivery

    answers = iter(["93.184.216.34", "127.0.0.1", "127.0.0.1"])
    lookups = []

    def getaddrinfo(host, port, *args, **kwargs):
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    sent = []

    def receive(request: httpx.Request) -> httpx.Response:
        sent.append((str(request.url), request.headers["host"], request.extensions.get("sni_hostname")))
        return httpx.Response(204)

    db = open_database(f"sqlite:///{tmp_path / 'jobs.db'}")
    with db.write() as conn:
        conn.execute(insert(webhook_deliveries).values(**delivery("video_1", "completed", "https://hooks.example.com:8443/in")))
    sender = WebhookSender(db, WebhookSettings(), "whsec_" + "A" * 32)

    async def send() -> int:
        async with httpx.AsyncClient(transport=httpx.MockTransport(receive)) as client:
            return await sender.send_due(client)

    assert asyncio.run(send()) == 1
    assert sent == [("https://93.184.216.34:8443/in", "hooks.example.com:8443", "hooks.example.com")]
    assert lookups == ["hooks.example.com"]
    with db.write() as conn:
        assert conn.execute(select(webhook_deliveries.c.state)).scalar_one() == "delivered"
        conn.execute(insert(webhook_deliveries).values(**delivery("video_2", "failed", "https://hooks.example.com/in")))
    assert asyncio.run(send()) == 1  # now the name resolves to loopback: refused, never called
    assert len(sent) == 1
    with db.write() as conn:
        error = conn.execute(select(webhook_deliveries.c.last_error).where(
            webhook_deliveries.c.job_id == "video_2")).scalar_one()
    assert "127.0.0.1" in error and "not a public address" in error
