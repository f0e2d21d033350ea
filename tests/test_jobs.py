"""Job ids and the OpenAI `Video` form of a job, read back by the `openai` client."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest
from openai.types import Video

from pusa_jobs.jobs import Job, job_created_at, new_job_id

T0 = 1_760_000_000.0


def make_job(created_at: float = T0, *, size: tuple[int, int] = (832, 480), frames: int = 81, fps: int = 16,
             **fields: Any) -> Job:
    job_id = new_job_id(created_at)
    return Job(
        id=job_id,
        created_at=job_created_at(job_id),
        request={"task": "t2v", "prompt": "a cat on the grass", "steps": 10},
        plan={"width": size[0], "height": size[1], "frames": frames, "fps": fps, "seed": 7, "steps": 10,
              "cost_gpu_s": 412.5},
        **fields,
    )


def test_new_job_id_format_and_order() -> None:
    ids = [new_job_id(T0 + i / 1000) for i in range(5)]
    assert all(len(i) == 30 and i.startswith("video_") and int(i[6:], 16) >= 0 for i in ids)
    assert ids == sorted(ids) and len({new_job_id(T0) for _ in range(100)}) == 100
    assert [job_created_at(i) for i in ids] == [round(T0 + i / 1000, 3) for i in range(5)]
    for bad in ("video_xyz", "nope", "video_" + "g" * 24):
        with pytest.raises(ValueError):
            job_created_at(bad)


@pytest.mark.parametrize(("frames", "fps", "seconds"), [(81, 25, "3.24"), (81, 16, "5.06"), (81, 27, "3")])
def test_to_openai_completed(frames: int, fps: int, seconds: str) -> None:
    job = make_job(size=(1280, 720), frames=frames, fps=fps, status="completed", progress=100,
                   completed_at=T0 + 99.7, extended_from="video_0")
    data = job.to_openai(queue_position=None)
    video = Video.model_validate(data)
    assert (video.id, video.status, video.progress, video.seconds) == (job.id, "completed", 100, seconds)
    assert (video.created_at, video.completed_at) == (int(T0), int(T0) + 99)
    assert (video.size, video.model) == ("1280x720", "pusa-v1")
    assert video.prompt == "a cat on the grass" and video.error is None and video.object == "video"
    assert data["pusa"] == {"task": "t2v", "seed": 7, "steps": 10, "windows": 1, "frames": frames, "fps": fps,
                            "queue_position": None, "extended_from": "video_0", "cost_gpu_s": 412.5}
    json.dumps(data)


def test_to_openai_failed() -> None:
    job = make_job(size=(720, 1280), status="failed", progress=30, completed_at=T0 + 5,
                   error={"code": "dit_unavailable", "message": "no DiT replica could be placed"})
    video = Video.model_validate(job.to_openai())
    assert video.status == "failed" and video.size == "720x1280"
    assert (video.error.code, video.error.message) == ("dit_unavailable", "no DiT replica could be placed")


@pytest.fixture
def video_api() -> Iterator[tuple[str, dict[str, dict]]]:
    """A loopback HTTP server answering `GET /v1/videos/{id}` from a dict of OpenAI objects: (base URL, dict)."""
    videos: dict[str, dict] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(videos[self.path.rsplit("/", 1)[-1]]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", videos
    server.shutdown()
    server.server_close()


@pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")
def test_openai_client_reads_cancelled_and_pusa_sizes(video_api: tuple[str, dict[str, dict]]) -> None:
    """The OpenAI client keeps values outside its enums (`cancelled`, 832x480) and the `pusa` extras."""
    base_url, videos = video_api
    job = make_job(status="cancelled", progress=60, completed_at=T0 + 9)
    videos[job.id] = job.to_openai()
    client = openai.OpenAI(api_key="unused", base_url=base_url, max_retries=0)
    video = client.videos.retrieve(job.id)
    assert (video.status, video.size, video.progress, video.seconds) == ("cancelled", "832x480", 60, "5.06")
    assert video.pusa["task"] == "t2v" and video.pusa["frames"] == 81
