"""The OpenAI-compatible video API over real HTTP, on the local profile deployed on a real local Ray
(one service for the whole module). Upload and queue limits: test_api_limits.py; the S3 store: test_api_s3.py.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import httpx
import pytest
from videoapi import TERMINAL, check_result, image_bytes, job_events, mp4_bytes, sse, wait_done, wait_status

from serving import running_service


GRACE_S = 3.0  # a job made by /v1/videos/stream outlives its dropped client this long
KEEPALIVE_S = 0.5
SLOW = {"size": "1024x1024", "frames": 1}  # DiT steps of ~0.3 s on a CPU core (64x64 steps take milliseconds)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store") / "store"


@pytest.fixture(scope="module")
def url(store) -> str:
    api = {"stream_grace_s": GRACE_S, "keepalive_s": KEEPALIVE_S}
    with running_service(str(store), api=api) as url:
        yield url


def create(url: str, **kwargs) -> dict:
    r = httpx.post(f"{url}/v1/videos", timeout=30, **kwargs)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["object"] == "video" and job["status"] == "queued" and job["id"].startswith("video_")
    return job


def completes(url: str, job: dict, tmp_path, frames: int = 17, size: tuple[int, int] = (64, 64)) -> dict:
    done = wait_done(url, job["id"])
    assert done["status"] == "completed", done
    assert done["progress"] == 100 and done["completed_at"] is not None and done["error"] is None
    check_result(url, job["id"], size[0], size[1], frames, tmp_path)
    return done


@pytest.fixture(scope="module")
def t2v_job(url) -> dict:
    """A completed t2v job (source for v2v and extensions)."""
    job = create(url, json={"prompt": "a cat walks on the grass", "steps": 2, "seed": 11})
    done = wait_done(url, job["id"])
    assert done["status"] == "completed", done
    return done


# -- every task ----------------------------------------------------------------------------------


def test_t2v_json(url, t2v_job, tmp_path):
    assert t2v_job["pusa"]["task"] == "t2v" and t2v_job["pusa"]["seed"] == 11 and t2v_job["pusa"]["steps"] == 2
    assert t2v_job["size"] == "64x64" and t2v_job["model"] == "pusa-v1"
    assert t2v_job["prompt"] == "a cat walks on the grass"
    check_result(url, t2v_job["id"], 64, 64, 17, tmp_path)


def test_t2v_json_size_and_seconds(url, tmp_path):
    job = create(url, json={"prompt": "a car", "model": "pusa-v1", "size": "48x32", "seconds": "0.2", "steps": 2})
    assert job["size"] == "48x32" and job["pusa"]["frames"] == 5
    completes(url, job, tmp_path, frames=5, size=(48, 32))


def test_i2v_multipart_input_reference(url, tmp_path):
    job = create(
        url,
        files={"input_reference": ("start.png", image_bytes("PNG"), "image/png")},
        data={"prompt": "the camera pans", "steps": "2", "seed": "7", "noise_multiplier": "0.3", "frames": "9"},
    )
    assert job["pusa"]["task"] == "i2v" and job["pusa"]["seed"] == 7 and job["pusa"]["steps"] == 2
    completes(url, job, tmp_path, frames=9)


def test_multi_frame_multipart_comma_lists(url, tmp_path):
    job = create(
        url,
        files=[("images", ("a.png", image_bytes("PNG", seed=1), "image/png")),
               ("images", ("b.jpg", image_bytes("JPEG", seed=2), "image/jpeg"))],
        data={"prompt": "keyframes", "task": "multi_frame", "positions": "0,4", "multipliers": "0.2,0.5", "steps": "2"},
    )
    assert job["pusa"]["task"] == "multi_frame"
    completes(url, job, tmp_path)


def test_multi_frame_multipart_repeated_bracket_fields(url, tmp_path):
    """Lists as repeated `name[]` fields, the way OpenAI's SDK encodes lists in multipart."""
    job = create(
        url,
        files=[("images[]", ("a.png", image_bytes("PNG", seed=3), "image/png")),
               ("images[]", ("b.jpg", image_bytes("JPEG", seed=4), "image/jpeg")),
               ("images[]", ("c.webp", image_bytes("WEBP", seed=5), "image/webp"))],
        data={"prompt": "three keyframes", "task": "multi_frame", "positions[]": ["0", "2", "4"],
              "multipliers[]": ["0.1", "0.4", "0.6"], "steps": "2"},
    )
    assert job["pusa"]["task"] == "multi_frame"
    completes(url, job, tmp_path)


def test_i2v_json_data_url(url, tmp_path):
    data_url = "data:image/png;base64," + base64.b64encode(image_bytes("PNG", seed=6)).decode()
    job = create(url, json={"prompt": "a still life", "task": "i2v", "images": [data_url], "steps": 2, "frames": 9})
    assert job["pusa"]["task"] == "i2v"
    completes(url, job, tmp_path, frames=9)


def test_v2v_completion_upload(url, tmp_path):
    job = create(
        url,
        files={"video": ("clip.mp4", mp4_bytes(17), "video/mp4")},
        data={"prompt": "fill in", "task": "v2v", "positions": "0,4", "multipliers": "0.3,0.3", "steps": "2"},
    )
    assert job["pusa"]["task"] == "v2v"
    completes(url, job, tmp_path)


@pytest.mark.parametrize("as_object", [False, True], ids=["id-string", "id-object"])
def test_v2v_completion_by_reference(url, t2v_job, tmp_path, as_object):
    ref = {"id": t2v_job["id"]} if as_object else t2v_job["id"]
    job = create(url, json={"prompt": "again", "task": "v2v", "video": ref, "positions": [0, 4], "steps": 2})
    completes(url, job, tmp_path)


def test_v2v_reference_to_unfinished_or_unknown_job(url):
    r = httpx.post(f"{url}/v1/videos", json={"prompt": "x", "task": "v2v", "video": "video_000000000000ffffffffffff"},
                   timeout=30)
    assert r.status_code == 404, r.text


def test_extension_by_id(url, t2v_job, tmp_path):
    r = httpx.post(f"{url}/v1/videos/extensions", timeout=30,
                   json={"prompt": "and then", "video": {"id": t2v_job["id"]}, "steps": 2, "seed": 4})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["pusa"]["extended_from"] == t2v_job["id"] and job["pusa"]["task"] == "v2v"
    done = completes(url, job, tmp_path)
    assert done["pusa"]["extended_from"] == t2v_job["id"]


def test_extension_upload(url, tmp_path):
    r = httpx.post(f"{url}/v1/videos/extensions", timeout=30,
                   files={"video": ("clip.mp4", mp4_bytes(21, seed=9), "video/mp4")},
                   data={"prompt": "continue", "steps": "2"})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["pusa"]["extended_from"] is None and job["pusa"]["task"] == "v2v"
    completes(url, job, tmp_path)


def test_extension_without_video(url):
    r = httpx.post(f"{url}/v1/videos/extensions", json={"prompt": "x"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "video"


# -- progress and events -------------------------------------------------------------------------


def test_progress_moves_every_step(url):
    job = create(url, json={"prompt": "progress", "steps": 8, "seed": 1})
    seen = [job["progress"]]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        view = httpx.get(f"{url}/v1/videos/{job['id']}", timeout=10).json()
        if view["progress"] != seen[-1]:
            seen.append(view["progress"])
        if view["status"] in TERMINAL:
            break
        time.sleep(0.02)
    assert view["status"] == "completed", view
    assert seen == sorted(seen) and len(set(seen)) == len(seen), seen
    assert len(seen) >= 5, seen
    assert seen[0] == 0 and seen[-1] == 100


def test_events_stream(url):
    steps = 4
    job = create(url, json={"prompt": "events", "steps": steps, "seed": 2})
    with httpx.stream("GET", f"{url}/v1/videos/{job['id']}/events", timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse(r))
    stored = [e for e in events if "id" in e]
    assert [int(e["id"]) for e in stored] == list(range(len(stored)))
    for e in events:
        assert e["event"] == e["data"]["type"]
    kinds = [e["event"] for e in stored]
    assert kinds == ["queued", "encoding"] + ["step"] * steps + ["decoding", "completed"], kinds
    assert {e["event"] for e in events if "id" not in e} <= {"queued"}  # live queue positions only
    step_events = [e["data"] for e in stored if e["event"] == "step"]
    assert [s["step"] for s in step_events] == list(range(1, steps + 1))
    for s in step_events:
        assert s["total"] == steps
        assert len(s["timesteps"]) == 5  # 17 frames -> 5 latent frames
        assert s["elapsed_s"] >= 0 and s["eta_s"] >= 0
    assert [s["elapsed_s"] for s in step_events] == sorted(s["elapsed_s"] for s in step_events)
    assert step_events[-1]["eta_s"] == 0
    assert step_events[0]["timesteps"][0] > step_events[-1]["timesteps"][0]
    done = stored[-1]["data"]
    assert done["url"] == f"/v1/videos/{job['id']}/content"
    assert httpx.get(f"{url}{done['url']}", timeout=30).headers["content-type"] == "video/mp4"

    # Resume after event 3: only later events come, and the stream ends at the terminal one.
    with httpx.stream("GET", f"{url}/v1/videos/{job['id']}/events", headers={"Last-Event-ID": "3"}, timeout=60) as r:
        resumed = list(sse(r))
    assert [int(e["id"]) for e in resumed] == list(range(4, len(stored)))
    assert resumed[-1]["event"] == "completed"


def test_events_bad_last_event_id(url, t2v_job):
    r = httpx.get(f"{url}/v1/videos/{t2v_job['id']}/events", headers={"Last-Event-ID": "abc"}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "Last-Event-ID"


# -- synchronous streaming -----------------------------------------------------------------------


def test_stream_endpoint_completes(url, tmp_path):
    with httpx.stream("POST", f"{url}/v1/videos/stream", json={"prompt": "stream", "steps": 2}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse(r))
    assert events[0]["event"] == "created" and events[0]["data"]["status"] == "queued"
    video_id = events[0]["data"]["id"]
    kinds = [e["event"] for e in events if "id" in e]
    assert kinds[0] == "queued" and kinds[-1] == "completed" and kinds.count("step") == 2, kinds
    assert events[-1]["event"] == "completed"
    check_result(url, video_id, 64, 64, 17, tmp_path)


def _drop_stream_after_a_step(url: str, steps: int) -> tuple[str, int]:
    """Start a streamed job, read until its first step, hang up; (video id, last event id seen)."""
    with httpx.stream("POST", f"{url}/v1/videos/stream", json={"prompt": "stream", "steps": steps, **SLOW},
                      timeout=120) as r:
        assert r.status_code == 200
        video_id, last = None, -1
        for event in sse(r):
            if event["event"] == "created":
                video_id = event["data"]["id"]
            if "id" in event:
                last = int(event["id"])
            if event["event"] == "step":
                break
    assert video_id is not None
    return video_id, last


def test_dropped_stream_cancels_its_job_after_the_grace_period(url):
    video_id, _ = _drop_stream_after_a_step(url, steps=40)
    dropped = time.monotonic()
    time.sleep(GRACE_S / 2)
    assert httpx.get(f"{url}/v1/videos/{video_id}", timeout=10).json()["status"] == "in_progress"
    job = wait_status(url, video_id, lambda j: j["status"] in TERMINAL, timeout=60)
    assert job["status"] == "cancelled", job
    assert GRACE_S <= time.monotonic() - dropped < GRACE_S + 10
    cancelled = job_events(url, video_id)[-1]
    assert cancelled["type"] == "cancelled" and cancelled["reason"] == "client_disconnected"
    assert cancelled["step"] < 40


def test_stream_resumed_within_the_grace_period_completes_without_loss(url):
    steps = 12
    video_id, last = _drop_stream_after_a_step(url, steps=steps)
    time.sleep(GRACE_S / 3)
    with httpx.stream("GET", f"{url}/v1/videos/{video_id}/events", headers={"Last-Event-ID": str(last)},
                      timeout=120) as r:
        resumed = [e for e in sse(r) if "id" in e]
    assert [int(e["id"]) for e in resumed] == list(range(last + 1, last + 1 + len(resumed)))  # no gap, no repeat
    assert resumed[-1]["event"] == "completed"
    steps_seen = [e["data"]["step"] for e in resumed if e["event"] == "step"]
    assert steps_seen == list(range(steps - len(steps_seen) + 1, steps + 1))
    assert httpx.get(f"{url}/v1/videos/{video_id}", timeout=10).json()["status"] == "completed"


def test_keepalive_comments_fill_a_long_step(url):
    with httpx.stream("POST", f"{url}/v1/videos/stream", json={"prompt": "slow", "steps": 3, "size": "1024x1024",
                                                                "frames": 5}, timeout=120) as r:
        lines = [line for line in r.iter_lines()]
    kinds = [line for line in lines if line.startswith(": ") or line.startswith("event: step")]
    first_step = kinds.index("event: step")
    assert ": keep-alive" in kinds[first_step:], kinds  # a step lasts longer than KEEPALIVE_S
    assert "event: completed" in lines


# -- listing, deleting, cancelling ---------------------------------------------------------------


def test_list_pagination(url):
    mine = [create(url, json={"prompt": f"list {i}", "steps": 1, "frames": 5})["id"] for i in range(3)]
    everything = httpx.get(f"{url}/v1/videos", params={"limit": 100, "order": "asc"}, timeout=30).json()
    assert everything["object"] == "list" and not everything["has_more"]
    ids = [v["id"] for v in everything["data"]]
    assert ids == sorted(ids) and ids[-3:] == mine
    assert everything["first_id"] == ids[0] and everything["last_id"] == ids[-1]

    for order in ("asc", "desc"):
        paged, after = [], None
        while True:
            params = {"limit": 2, "order": order, **({"after": after} if after else {})}
            page = httpx.get(f"{url}/v1/videos", params=params, timeout=30).json()
            assert len(page["data"]) <= 2
            paged += [v["id"] for v in page["data"]]
            if not page["has_more"]:
                break
            assert len(page["data"]) == 2
            after = page["last_id"]
        assert paged == (ids if order == "asc" else ids[::-1])

    default = httpx.get(f"{url}/v1/videos", params={"limit": 3}, timeout=30).json()
    assert [v["id"] for v in default["data"]] == mine[::-1]  # newest first by default
    for params in ({"limit": 0}, {"limit": 101}, {"order": "sideways"}):
        r = httpx.get(f"{url}/v1/videos", params=params, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(params))
    for video_id in mine:
        assert wait_done(url, video_id)["status"] == "completed"


def test_delete_completed(url):
    job = create(url, json={"prompt": "delete me", "steps": 1, "frames": 5})
    assert wait_done(url, job["id"])["status"] == "completed"
    r = httpx.delete(f"{url}/v1/videos/{job['id']}", timeout=30)
    assert r.status_code == 200 and r.json() == {"id": job["id"], "object": "video.deleted", "deleted": True}
    for path in ("", "/content", "/events"):
        assert httpx.get(f"{url}/v1/videos/{job['id']}{path}", timeout=30).status_code == 404
    assert httpx.delete(f"{url}/v1/videos/{job['id']}", timeout=30).status_code == 404
    listed = httpx.get(f"{url}/v1/videos", params={"limit": 100}, timeout=30).json()
    assert job["id"] not in [v["id"] for v in listed["data"]]


def _running_job(url: str) -> dict:
    job = create(url, json={"prompt": "long", "steps": 30, "seed": 9})
    running = wait_status(url, job["id"], lambda j: j["status"] in TERMINAL or j["progress"] >= 2 + 93 * 2 // 30)
    assert running["status"] == "in_progress", running
    r = httpx.get(f"{url}/v1/videos/{job['id']}/content", timeout=30)
    assert r.status_code == 409 and r.json()["error"]["param"] == "video_id"
    return running


def _check_cancelled(url: str, video_id: str, steps_at_cancel: int, cancel_sent: float) -> None:
    job = wait_status(url, video_id, lambda j: j["status"] in TERMINAL, timeout=30)
    took = time.monotonic() - cancel_sent
    assert job["status"] == "cancelled" and job["progress"] < 100, job
    events = job_events(url, video_id)
    steps = [e for e in events if e["type"] == "step"]
    assert events[-1]["type"] == "cancelled"
    assert len(steps) <= steps_at_cancel + 1, (steps_at_cancel, [e["step"] for e in steps])
    step_s = steps[-1]["elapsed_s"] / len(steps)
    assert took < 2 * step_s + 3, (took, step_s)
    assert httpx.get(f"{url}/v1/videos/{video_id}/content", timeout=30).status_code == 409


def _steps_so_far(url: str, video_id: str) -> int:
    """Steps of a 30-step job done by now, from its progress (2 + 93 k / 30 after step k; kept when cancelled)."""
    progress = httpx.get(f"{url}/v1/videos/{video_id}", timeout=10).json()["progress"]
    return sum(1 for k in range(1, 31) if 2 + 93 * k // 30 <= progress)


def test_cancel_running_job(url):
    job = _running_job(url)
    sent = time.monotonic()
    r = httpx.post(f"{url}/v1/videos/{job['id']}/cancel", timeout=30)
    assert r.status_code == 200 and r.json()["id"] == job["id"]
    # The marker is written before the reply: at most the step in flight may still land.
    _check_cancelled(url, job["id"], _steps_so_far(url, job["id"]), sent)


def test_delete_running_job(url, store):
    """Deleting a running job hides it at once, cancels it, and removes its files once it stops."""
    job = _running_job(url)
    r = httpx.delete(f"{url}/v1/videos/{job['id']}", timeout=30)
    assert r.status_code == 200
    assert r.json() == {"id": job["id"], "object": "video.deleted", "deleted": True}
    for path in ("", "/content", "/events"):
        assert httpx.get(f"{url}/v1/videos/{job['id']}{path}", timeout=30).status_code == 404
    assert httpx.delete(f"{url}/v1/videos/{job['id']}", timeout=30).status_code == 404
    deadline = time.monotonic() + 30
    while any(store.glob(f"*/{job['id']}")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(store.glob(f"*/{job['id']}")), list(store.glob(f"*/{job['id']}/*"))


def test_cancel_finished_job_is_a_no_op(url, t2v_job):
    r = httpx.post(f"{url}/v1/videos/{t2v_job['id']}/cancel", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "completed"


# -- bad input -----------------------------------------------------------------------------------

PNG = ("x.png", image_bytes("PNG"), "image/png")

BAD_JSON = [
    ("steps-0", {"steps": 0}, "steps", "greater than or equal to 1"),
    ("steps-99", {"steps": 99}, "steps", "less than or equal to 50"),
    ("frames-80", {"frames": 80}, "frames", "4k+1"),
    ("size-100x64", {"size": "100x64"}, "size", "multiples of 16 from 16 to 1920, got 100x64"),
    ("size-too-big", {"size": "4000x64"}, "size", "got 4000x64"),
    ("size-garbage", {"size": "big"}, "size", "WIDTHxHEIGHT"),
    ("multiplier-range", {"task": "v2v", "video": "VIDEO", "positions": [0, 4], "multipliers": [0.3, 1.5]},
     "multipliers", "1.5 is outside [0, 1]"),
    ("duplicate-positions", {"task": "v2v", "video": "VIDEO", "positions": [2, 2]}, "positions", "more than once"),
    ("i2v-without-image", {"task": "i2v"}, "images", "exactly one image"),
    ("unknown-model", {"model": "sora-2"}, "model", "unknown model 'sora-2'"),
    ("unknown-field", {"stpes": 3}, "stpes", "Extra inputs are not permitted"),
    ("bad-data-url", {"task": "i2v", "images": ["http://example.com/x.png"]}, "images[0]", "data URL"),
    ("empty-prompt", {"prompt": ""}, "prompt", "at least 1 character"),
    ("bad-task", {"task": "t3v"}, "task", "t2v"),
    ("video-object-without-id", {"task": "v2v", "video": {"name": "x"}}, "video", '{"id": "video_..."}'),
    ("video-not-a-reference", {"task": "v2v", "video": "clip.mp4"}, "video", "data URL"),
]


@pytest.mark.parametrize("body,param,message", [b[1:] for b in BAD_JSON], ids=[b[0] for b in BAD_JSON])
def test_bad_json_request(url, t2v_job, body, param, message):
    body = {"prompt": "p", **body}
    if body.get("video") == "VIDEO":
        body["video"] = t2v_job["id"]
    before = httpx.get(f"{url}/v1/videos", params={"limit": 1}, timeout=30).json()["first_id"]
    r = httpx.post(f"{url}/v1/videos", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert error["type"] == "invalid_request_error"
    assert httpx.get(f"{url}/v1/videos", params={"limit": 1}, timeout=30).json()["first_id"] == before


BAD_MULTIPART = [
    ("garbage-input-reference", [("input_reference", ("x.png", b"this is not an image", "image/png"))], {},
     "images[0]", "cannot read image"),
    ("garbage-keyframe", [("images", PNG), ("images", ("y.webp", b"RIFF0000WEBPjunk", "image/webp"))],
     {"task": "multi_frame"}, "images[1]", "cannot read image"),
    ("video-too-short", [("video", ("short.mp4", mp4_bytes(5), "video/mp4"))], {"task": "v2v", "positions": "0,4"},
     "video", "needs at least 17"),
    ("garbage-video", [("video", ("x.mp4", b"\x00" * 500, "video/mp4"))], {"task": "v2v"}, "video",
     "cannot read video"),
    ("multipliers-count", [("input_reference", PNG)], {"multipliers": "0.1,0.2"}, "multipliers", "2 multipliers"),
    ("steps-not-a-number", [("input_reference", PNG)], {"steps": "many"}, "steps", "integer"),
]


@pytest.mark.parametrize("files,data,param,message", [b[1:] for b in BAD_MULTIPART], ids=[b[0] for b in BAD_MULTIPART])
def test_bad_multipart_request(url, files, data, param, message):
    r = httpx.post(f"{url}/v1/videos", files=files, data={"prompt": "p", **data}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_malformed_json_body(url):
    for content in (b'{"prompt": "p", "steps": ', b"\xff\xfe not json", b'["a list"]'):
        r = httpx.post(f"{url}/v1/videos", content=content, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400, r.text
        assert "JSON" in r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_ids_are_404(url):
    for video_id in ("video_000000000000aaaaaaaaaaaa", "nope..", "a" * 200):
        for method, path in (("GET", ""), ("GET", "/content"), ("GET", "/events"), ("DELETE", ""),
                             ("POST", "/cancel")):
            r = httpx.request(method, f"{url}/v1/videos/{video_id}{path}", timeout=30)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["error"]["type"] == "not_found"


def test_bad_variant(url, t2v_job):
    r = httpx.get(f"{url}/v1/videos/{t2v_job['id']}/content", params={"variant": "bogus"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "variant"


def test_models_and_health(url):
    assert [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]] == ["pusa-v1"]
    assert httpx.get(f"{url}/health", timeout=30).json()["preset"] == "tiny"


def test_a_model_this_deployment_does_not_serve_is_refused(url):
    """The default profile serves pusa-v1 only: a pusa-wan2.2 request is a 400 naming ``model``."""
    r = httpx.post(f"{url}/v1/videos", json={"prompt": "a cat", "model": "pusa-wan2.2"}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "model" and "not served" in error["message"], error
