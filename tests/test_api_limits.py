"""Input and queue limits of the video API, on the local profile deployed on a real local Ray with a small
`max_upload_bytes`, one runner with room for one running job, and a queue of one: bodies counted as they
arrive, decompression bombs and absurd videos refused from their headers, non-finite and wrongly typed
numbers refused naming the field."""

from __future__ import annotations

import http.client
import io
import json
import os
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import imageio_ffmpeg
import psutil
import pytest
import ray
from PIL import Image
from service_probe import ServiceProbe
from videoapi import image_bytes, wait_done, wait_status

from deployments.openai_api import body_limit
from serving import running_service

MAX_UPLOAD_BYTES = 200_000
MAX_FRAMES = 500


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    store = tmp_path_factory.mktemp("store") / "store"
    api = {"max_upload_bytes": MAX_UPLOAD_BYTES, "max_queued_jobs": 1, "media": {"max_frames": MAX_FRAMES}}
    with running_service(str(store), api=api, runner={"max_running_jobs": 1}) as url:
        yield url, store


@pytest.fixture(scope="module")
def limits_url(service) -> str:
    return service[0]


def router_rss() -> int:
    """Resident memory of the Router replica's process, in bytes."""
    actor = ServiceProbe.replicas("Router")[0][1]
    return psutil.Process(ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10)).memory_info().rss


def stored_inputs(store: Path) -> set[str]:
    return {p.name for p in (store / "inputs").iterdir()} if (store / "inputs").is_dir() else set()


def test_upload_over_limit_is_413(limits_url):
    big = image_bytes("PNG", size=(400, 400))  # ~480 kB of noise
    assert len(big) > MAX_UPLOAD_BYTES
    r = httpx.post(f"{limits_url}/v1/videos", files={"input_reference": ("big.png", big, "image/png")},
                   data={"prompt": "p"}, timeout=30)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["type"] == "request_too_large"
    r = httpx.post(f"{limits_url}/v1/videos", json={"prompt": "x" * body_limit(MAX_UPLOAD_BYTES)}, timeout=30)
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


def test_oversize_bodies_are_counted_as_they_arrive(service):
    url, store = service
    before = stored_inputs(store)
    limit = body_limit(MAX_UPLOAD_BYTES)
    chunk = b"A" * 65536

    def endless_json():  # chunked, no Content-Length, far beyond the limit
        yield b'{"prompt": "'
        for _ in range(500):  # 33 MB if it were all read
            yield chunk

    def endless_upload():  # one multipart file part that never ends
        yield b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\np\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="input_reference"; filename="a.png"\r\n'
        yield b"Content-Type: image/png\r\n\r\n"
        for _ in range(500):
            yield chunk

    for _ in range(2):
        started = time.monotonic()
        r = httpx.post(f"{url}/v1/videos", content=endless_json(), headers={"content-type": "application/json"},
                       timeout=30)
        assert r.status_code == 413 and f"limit of {limit} bytes" in r.json()["error"]["message"], r.text
        assert time.monotonic() - started < 5
        r = httpx.post(f"{url}/v1/videos", content=endless_upload(),
                       headers={"content-type": "multipart/form-data; boundary=b"}, timeout=30)
        assert r.status_code == 413, r.text
    conn = http.client.HTTPConnection(urlparse(url).netloc, timeout=30)  # a Content-Length no body will meet
    conn.putrequest("POST", "/v1/videos")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", "99999999999")
    conn.endheaders(b"{}")
    assert conn.getresponse().status == 413
    conn.close()
    assert stored_inputs(store) == before  # nothing of them was stored


def png_bomb() -> bytes:
    """A 40000×40000 PNG (1.6 gigapixels) of one colour: about 230 kB compressed."""
    buf = io.BytesIO()
    Image.new("1", (40000, 40000)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def long_video(tmp_path: Path) -> bytes:
    """A 16×16 H.264 video of 10000 frames (1000 fps for 10 s)."""
    path = tmp_path / "long.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i",
                    "color=c=black:s=16x16:r=1000:d=10", "-c:v", "libx264", "-preset", "ultrafast", str(path)],
                   check=True, timeout=120)
    return path.read_bytes()


def test_decompression_bomb_and_absurd_video_are_refused_within_a_second(service, tmp_path):
    url, store = service
    before, rss = stored_inputs(store), router_rss()
    bomb = png_bomb()
    assert len(bomb) < MAX_UPLOAD_BYTES
    started = time.monotonic()
    r = httpx.post(f"{url}/v1/videos", files={"input_reference": ("bomb.png", bomb, "image/png")},
                   data={"prompt": "p"}, timeout=30)
    assert time.monotonic() - started < 1.0
    assert r.status_code == 400 and r.json()["error"]["param"] == "images[0]", r.text
    assert f"exceeds the limit of {4096 * 4096} pixels" in r.json()["error"]["message"]

    video = long_video(tmp_path)
    assert len(video) < MAX_UPLOAD_BYTES
    for anchor in ("start", "end"):  # "end" would have to decode every frame to find the last ones
        started = time.monotonic()
        r = httpx.post(f"{url}/v1/videos", files={"video": ("long.mp4", video, "video/mp4")},
                       data={"prompt": "p", "task": "v2v", "video_anchor": anchor}, timeout=30)
        assert time.monotonic() - started < 1.0
        assert r.status_code == 400 and r.json()["error"]["param"] == "video", r.text
        assert f"the limit is {MAX_FRAMES}" in r.json()["error"]["message"]
    assert stored_inputs(store) == before
    assert router_rss() - rss < 50 << 20


@pytest.mark.parametrize("body, param", [
    ({"prompt": "p", "guidance": float("nan")}, "guidance"),
    ({"prompt": "p", "guidance": float("inf")}, "guidance"),
    ({"prompt": "p", "noise_multiplier": float("-inf")}, "noise_multiplier"),
    ({"prompt": "p", "task": "multi_frame", "multipliers": [float("nan")]}, "multipliers.0"),
    ({"prompt": "p", "lora_alpha": "NaN"}, "lora_alpha"),
    ({"prompt": "p", "seconds": float("nan")}, "seconds"),
    ({"prompt": "p", "seconds": -2}, "seconds"),
    ({"prompt": "p", "seconds": "soon"}, "seconds"),
    ({"prompt": "p", "seconds": [4]}, "seconds"),
    ({"prompt": "p", "seconds": True}, "seconds"),
    ({"prompt": "p", "seconds": 60}, "seconds"),
    ({"prompt": "p", "seconds": 4, "fps": "fast"}, "fps"),
    ({"prompt": "p", "seconds": 4, "fps": 2.5}, "fps"),
    ({"prompt": "p", "steps": "ten"}, "steps"),
    ({"prompt": "p", "steps": [4]}, "steps"),
    ({"prompt": "p", "steps": 2.5}, "steps"),
    ({"prompt": "p", "seed": -1}, "seed"),
    ({"prompt": "p", "seed": 2**64}, "seed"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "p", "size": {"w": 64}}, "size"),
    ({"prompt": "p", "size": "64x64x64"}, "size"),
    ({"prompt": "p", "positions": [1.5]}, "positions.0"),
    ({"prompt": "p", "model": ["pusa-v1"]}, "model"),
])
def test_numbers_must_be_finite_and_of_the_right_type(limits_url, body, param):
    r = httpx.post(f"{limits_url}/v1/videos", content=json.dumps(body), timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("content, content_type", [
    (b"[1, 2]", "application/json"), (b'"text"', "application/json"), (b"", "application/json"),
    (b"\xff\xfe", "application/json"), (b"prompt=p", "application/x-www-form-urlencoded"),
    (b"--x\r\n", "multipart/form-data"), (b"--x\r\nbroken", "multipart/form-data; boundary=x"),
])
def test_body_shapes_that_are_not_requests_are_400(limits_url, content, content_type):
    r = httpx.post(f"{limits_url}/v1/videos", content=content, headers={"content-type": content_type}, timeout=30)
    assert r.status_code == 400, r.text


def test_a_body_any_web_page_could_send_is_refused(limits_url):
    """Without API keys: text/plain (what a page may POST without asking) and a page of another origin are
    refused and create nothing; the service's own page (same origin) and clients sending no Origin pass."""
    before = httpx.get(f"{limits_url}/v1/videos?limit=100", timeout=30).json()["data"]
    r = httpx.post(f"{limits_url}/v1/videos", content=json.dumps({"prompt": "p", "steps": 1, "frames": 5}),
                   headers={"content-type": "text/plain"}, timeout=30)
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"], r.text
    r = httpx.post(f"{limits_url}/v1/videos", data={"prompt": "p", "steps": "1", "frames": "5"},
                   files={"x": ("x.txt", b"", "text/plain")}, headers={"origin": "https://evil.example"}, timeout=30)
    assert r.status_code == 403 and "https://evil.example" in r.json()["error"]["message"], r.text
    r = httpx.delete(f"{limits_url}/v1/videos/video_0", headers={"origin": "http://localhost:1"}, timeout=30)
    assert r.status_code == 403, r.text
    assert httpx.get(f"{limits_url}/v1/videos?limit=100", timeout=30).json()["data"] == before
    host = urlparse(limits_url).netloc
    r = httpx.post(f"{limits_url}/v1/videos/plan", json={"prompt": "p", "steps": 1, "frames": 5},
                   headers={"origin": f"http://{host}"}, timeout=30)
    assert r.status_code == 200, r.text


def test_deeply_nested_json_is_400(limits_url):
    body = '{"prompt": "p", "positions": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = httpx.post(f"{limits_url}/v1/videos", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"], r.text
