"""The local profile deploys on a real local Ray and completes a text-to-video job over HTTP."""

import time

import httpx

from pusa_model.media import probe_video
from serving import running_service


def test_t2v_job_completes(tmp_path):
    with running_service(str(tmp_path / "store")) as url:
        job = httpx.post(f"{url}/v1/videos", json={"prompt": "a cat", "steps": 3, "seed": 5}, timeout=30).json()
        assert job["status"] == "queued" and job["pusa"]["seed"] == 5
        deadline = time.monotonic() + 120
        while job["status"] not in ("completed", "failed") and time.monotonic() < deadline:
            time.sleep(0.5)
            job = httpx.get(f"{url}/v1/videos/{job['id']}", timeout=10).json()
        assert job["status"] == "completed", job
        video = httpx.get(f"{url}/v1/videos/{job['id']}/content", timeout=30)
        assert video.headers["content-type"] == "video/mp4"
        (tmp_path / "out.mp4").write_bytes(video.content)
        info = probe_video(tmp_path / "out.mp4")
        assert (info["width"], info["height"], info["frames"]) == (64, 64, 17)
