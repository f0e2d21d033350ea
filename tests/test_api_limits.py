"""Upload and queue limits of the video API, on the local profile deployed on a real local Ray with a small
`max_upload_bytes`, one runner with room for one running job, and a queue of one."""

from __future__ import annotations

import httpx
import pytest
from videoapi import image_bytes, wait_done, wait_status

from serving import running_service

MAX_UPLOAD_BYTES = 200_000


@pytest.fixture(scope="module")
def limits_url(tmp_path_factory) -> str:
    with running_service(str(tmp_path_factory.mktemp("store") / "store"),
                         api={"max_upload_bytes": MAX_UPLOAD_BYTES, "max_queued_jobs": 1},
                         runner={"max_running_jobs": 1}) as url:
        yield url


def test_upload_over_limit_is_413(limits_url):
    big = image_bytes("PNG", size=(400, 400))  # ~480 kB of noise
    assert len(big) > MAX_UPLOAD_BYTES
    r = httpx.post(f"{limits_url}/v1/videos", files={"input_reference": ("big.png", big, "image/png")},
                   data={"prompt": "p"}, timeout=30)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["type"] == "request_too_large"
    r = httpx.post(f"{limits_url}/v1/videos", json={"prompt": "x" * 300_000}, timeout=30)
    assert r.status_code == 413, r.text
    # Chunked (no Content-Length): the uploads are counted as they are read.
    body = httpx.Request("POST", limits_url, files={"input_reference": ("big.png", big, "image/png")},
                         data={"prompt": "p"})
    content = body.read()
    chunks = (content[i:i + 65536] for i in range(0, len(content), 65536))
    r = httpx.post(f"{limits_url}/v1/videos", content=chunks, timeout=30,
                   headers={"content-type": body.headers["content-type"]})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["param"] == "input_reference"
    # Under the limit the same service accepts uploads.
    small = image_bytes("PNG", size=(64, 64))
    r = httpx.post(f"{limits_url}/v1/videos", files={"input_reference": ("s.png", small, "image/png")},
                   data={"prompt": "p", "steps": "1", "frames": "5"}, timeout=30)
    assert r.status_code == 200, r.text
    assert wait_done(limits_url, r.json()["id"])["status"] == "completed"


def test_overload_is_429_and_accepted_jobs_complete(limits_url):
    before = {v["id"] for v in httpx.get(f"{limits_url}/v1/videos", params={"limit": 100}, timeout=30).json()["data"]}
    r = httpx.post(f"{limits_url}/v1/videos", json={"prompt": "running", "steps": 40, "seed": 9}, timeout=30)
    assert r.status_code == 200, r.text
    accepted, refused = [r.json()["id"]], None
    assert wait_status(limits_url, accepted[0], lambda j: j["status"] != "queued")["status"] == "in_progress"
    for i in range(6):
        r = httpx.post(f"{limits_url}/v1/videos", json={"prompt": f"load {i}", "steps": 20, "seed": i}, timeout=30)
        if r.status_code == 429:
            refused = r
            break
        assert r.status_code == 200, r.text
        accepted.append(r.json()["id"])
    assert refused is not None, "no request was refused"
    assert len(accepted) == 2, accepted  # one running, one queued
    assert int(refused.headers["Retry-After"]) > 0
    assert refused.json()["error"]["type"] == "rate_limit_exceeded"
    listed = {v["id"] for v in httpx.get(f"{limits_url}/v1/videos", params={"limit": 100}, timeout=30).json()["data"]}
    assert listed - before == set(accepted)  # the refused request left no job behind
    for video_id in accepted:
        job = wait_done(limits_url, video_id, timeout=120)
        assert job["status"] == "completed", job
    # Room again once they are done.
    r = httpx.post(f"{limits_url}/v1/videos", json={"prompt": "after", "steps": 1, "frames": 5}, timeout=30)
    assert r.status_code == 200, r.text
    assert wait_done(limits_url, r.json()["id"])["status"] == "completed"
