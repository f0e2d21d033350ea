"""Helpers for the HTTP API tests: media to upload, job polling, SSE parsing, result checks."""

from __future__ import annotations

import io
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from pusa_model.media import probe_video, write_mp4

TERMINAL = ("completed", "failed", "cancelled")


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (80, 60), seed: int = 0) -> bytes:
    """A small noisy RGB image encoded as `fmt` (PNG, JPEG or WEBP)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def mp4_bytes(frames: int = 17, width: int = 64, height: int = 64, seed: int = 0) -> bytes:
    """An H.264 MP4 of `frames` noisy frames."""
    pixels = np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        write_mp4(pixels, path, 25)
        return path.read_bytes()


def wait_done(url: str, video_id: str, timeout: float = 120.0, poll_s: float = 0.25) -> dict:
    """Poll the job until it reaches a terminal status; return its last view."""
    deadline = time.monotonic() + timeout
    while True:
        job = httpx.get(f"{url}/v1/videos/{video_id}", timeout=10).json()
        if job["status"] in TERMINAL or time.monotonic() > deadline:
            return job
        time.sleep(poll_s)


def wait_status(url: str, video_id: str, predicate, timeout: float = 60.0, poll_s: float = 0.05) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = httpx.get(f"{url}/v1/videos/{video_id}", timeout=10).json()
        if predicate(job) or time.monotonic() > deadline:
            return job
        time.sleep(poll_s)


def job_events(url: str, video_id: str) -> list[dict]:
    """The stored events of a finished job, read through the SSE endpoint."""
    with httpx.stream("GET", f"{url}/v1/videos/{video_id}/events", timeout=30) as r:
        assert r.status_code == 200, r.read()
        return [e["data"] for e in sse(r) if "id" in e]


def sse(response: httpx.Response) -> Iterator[dict]:
    """Parse a text/event-stream body into {"event", "id"?, "data"} dicts (data JSON-decoded)."""
    event: dict = {}
    data: list[str] = []
    for line in response.iter_lines():
        if line == "":
            if data or event:
                event.setdefault("event", "message")
                event["data"] = json.loads("\n".join(data)) if data else None
                yield event
            event, data = {}, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name in ("event", "id", "retry"):
            event[name] = value


def check_result(url: str, video_id: str, width: int, height: int, frames: int, tmp_path: Path) -> None:
    """The job's content is an MP4 of the given shape and its thumbnail a WebP image."""
    r = httpx.get(f"{url}/v1/videos/{video_id}/content", timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4"
    path = tmp_path / f"{video_id}.mp4"
    path.write_bytes(r.content)
    info = probe_video(path)
    assert (info["width"], info["height"], info["frames"], info["codec"]) == (width, height, frames, "h264"), info
    t = httpx.get(f"{url}/v1/videos/{video_id}/content", params={"variant": "thumbnail"}, timeout=30)
    assert t.status_code == 200, t.text
    assert t.headers["content-type"] == "image/webp"
    assert t.content[:4] == b"RIFF" and t.content[8:12] == b"WEBP"
    with Image.open(io.BytesIO(t.content)) as thumb:
        assert thumb.format == "WEBP" and thumb.size == (width, height)
