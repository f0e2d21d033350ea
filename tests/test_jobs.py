"""Job records on a local folder and on S3 (a real SeaweedFS server), and their OpenAI `Video` form."""

from __future__ import annotations

import json
import random
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types import Video
from s3server import S3Server, s3_server_fixture, use_test_credentials

from deployments.jobs import Job, JobStore, new_job_id
from deployments.storage import LocalStore, S3Store, open_store

s3_server = s3_server_fixture(scope="module")

T0 = 1_760_000_000.0


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    use_test_credentials(monkeypatch, tmp_path)


@pytest.fixture(params=["local", "s3"])
def jobs(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> JobStore:
    """A job store on an empty local folder or a fresh S3 prefix (reopenable by `open_store(uri)`)."""
    if request.param == "local":
        return JobStore(LocalStore(tmp_path / "store"))
    server: S3Server = request.getfixturevalue("s3_server")
    monkeypatch.setenv("PUSA_S3_ENDPOINT", server.endpoint)
    return JobStore(S3Store("pusa-jobs-test", f"tests/{uuid.uuid4().hex}", endpoint_url=server.endpoint))


def make_job(created_at: float = T0, *, size: tuple[int, int] = (832, 480), frames: int = 81, fps: int = 16,
             **fields: Any) -> Job:
    return Job(
        id=new_job_id(created_at),
        created_at=created_at,
        request={"task": "t2v", "prompt": "a cat on the grass", "steps": 10},
        plan={"width": size[0], "height": size[1], "frames": frames, "fps": fps, "seed": 7, "steps": 10},
        **fields,
    )


def test_new_job_id_format_and_order() -> None:
    ids = [new_job_id(T0 + i / 1000) for i in range(5)]
    assert all(len(i) == 30 and i.startswith("video_") and int(i[6:], 16) >= 0 for i in ids)
    assert ids == sorted(ids) and len({new_job_id(T0) for _ in range(100)}) == 100


def test_create_get_save(jobs: JobStore) -> None:
    job = jobs.create(make_job(inputs={"image": "inputs/x/image"}))
    assert jobs.get(job.id) == job
    job.status, job.progress, job.started_at = "in_progress", 40, T0 + 1
    jobs.save(job)
    assert jobs.get(job.id) == job and jobs.get(job.id).progress == 40
    for missing in (new_job_id(), "../etc/passwd", "a/b", ""):
        with pytest.raises(KeyError):
            jobs.get(missing)


def test_list_pages_in_creation_order(jobs: JobStore) -> None:
    made = [make_job(T0 + i) for i in range(5)]
    for job in random.Random(0).sample(made, len(made)):
        jobs.create(job)
    jobs.request_cancel(made[2].id)
    ids = [job.id for job in made]

    def page(**kwargs: Any) -> list[str]:
        return [job.id for job in jobs.list(**kwargs)]

    assert page() == ids[::-1]
    assert page(limit=2) == [ids[4], ids[3]]
    assert page(limit=2, after=ids[3]) == [ids[2], ids[1]]
    assert page(limit=2, after=ids[1]) == [ids[0]]
    assert page(limit=2, after=ids[0]) == []
    assert page(limit=2, order="asc") == [ids[0], ids[1]]
    assert page(limit=2, order="asc", after=ids[1]) == [ids[2], ids[3]]
    assert page(limit=2, order="asc", after=ids[4]) == []
    jobs.delete(ids[3])  # a cursor that no longer exists still pages on
    assert page(limit=2, after=ids[3]) == [ids[2], ids[1]]


def test_active_index_follows_status(jobs: JobStore) -> None:
    a, b, c = (jobs.create(make_job(T0 + i)) for i in range(3))
    assert jobs.active_ids() == [a.id, b.id, c.id]
    a.status = "in_progress"
    jobs.save(a)
    for job, status in ((b, "completed"), (c, "cancelled")):
        job.status = status
        jobs.save(job)
    assert jobs.active_ids() == [a.id]
    a.status = "failed"
    jobs.save(a)
    assert jobs.active_ids() == []
    a.status = "queued"  # re-queued: active again
    jobs.save(a)
    assert jobs.active_ids() == [a.id]


def test_delete_removes_everything(jobs: JobStore) -> None:
    keep = jobs.create(make_job(T0))
    jobs.put_input(keep.id, "image", b"png")
    job = jobs.create(make_job(T0 + 1))
    job.inputs["image"] = jobs.put_input(job.id, "image", b"png")
    jobs.put_input(job.id, "video", b"mp4")
    jobs.put_result(job.id, b"mp4", b"webp")
    jobs.request_cancel(job.id)
    jobs.save(job)
    jobs.delete(job.id)
    with pytest.raises(KeyError):
        jobs.get(job.id)
    assert jobs.store.list("") == [f"active/{keep.id}", f"inputs/{keep.id}/image", f"jobs/{keep.id}.json"]
    jobs.delete(job.id)  # again: nothing to do


def test_events_have_monotonic_seq(jobs: JobStore) -> None:
    job = jobs.create(make_job())
    sent = [{"type": "queued", "position": 2}, {"type": "step", "step": 1}, {"type": "step", "step": 2}]
    returned = [jobs.add_event(job, event) for event in sent]
    assert [event["seq"] for event in returned] == [0, 1, 2]
    assert returned[1] == {"type": "step", "step": 1, "seq": 1} and "seq" not in sent[1]
    assert job.events == returned
    assert jobs.events_after(job.id, -1) == []  # not saved yet
    jobs.save(job)
    assert jobs.events_after(job.id, -1) == returned
    assert jobs.events_after(job.id, 0) == returned[1:]
    assert jobs.events_after(job.id, 2) == []
    assert jobs.add_event(jobs.get(job.id), {"type": "decoding"})["seq"] == 3


def test_cancel_marker_from_another_replica(jobs: JobStore) -> None:
    job = jobs.create(make_job())
    other = JobStore(open_store(jobs.store.uri))  # another router replica on the same store
    assert not jobs.cancel_requested(job.id)
    other.request_cancel(job.id)
    job.progress = 50
    jobs.save(job)  # the owner's writes don't clear the marker
    assert jobs.cancel_requested(job.id) and other.cancel_requested(job.id)
    assert jobs.get(job.id).progress == 50


def test_stale_jobs_and_claim(jobs: JobStore) -> None:
    beat_long_ago = jobs.create(make_job(T0, owner="r1", heartbeat_at=T0 + 100))
    never_beat = jobs.create(make_job(T0 + 50))
    jobs.create(make_job(T0 + 1, owner="r2", heartbeat_at=T0 + 190))  # beat recently: not stale
    done = make_job(T0 + 2)
    jobs.create(done)
    done.status = "completed"
    jobs.save(done)
    jobs.store.put(f"active/{new_job_id(T0 + 3)}", b"")  # a record not yet written
    now = T0 + 200
    assert [job.id for job in jobs.stale_jobs(now, 30)] == [beat_long_ago.id, never_beat.id]
    assert [job.id for job in jobs.stale_jobs(now, 120)] == [never_beat.id]
    assert jobs.stale_jobs(now, 1000) == []

    adopted = jobs.claim(jobs.stale_jobs(now, 30)[0], "r3", now)
    assert (adopted.owner, adopted.heartbeat_at, adopted.attempts) == ("r3", now, 1)
    assert jobs.get(beat_long_ago.id) == adopted
    assert [job.id for job in jobs.stale_jobs(now, 30)] == [never_beat.id]
    assert jobs.claim(jobs.get(adopted.id), "r4", now + 500).attempts == 2


def test_inputs_and_results(jobs: JobStore) -> None:
    job = jobs.create(make_job())
    key = jobs.put_input(job.id, "input_reference", b"png bytes")
    assert key == f"inputs/{job.id}/input_reference" and jobs.store.get(key) == b"png bytes"
    keys = jobs.put_result(job.id, b"mp4 bytes", b"webp bytes")
    assert keys == {"video": jobs.result_key(job.id, "video"), "thumbnail": jobs.result_key(job.id, "thumbnail")}
    assert keys["video"] == f"results/{job.id}/video.mp4"
    assert jobs.store.get(keys["video"]) == b"mp4 bytes"
    assert jobs.store.get(keys["thumbnail"]) == b"webp bytes"


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
    assert data["pusa"] == {"task": "t2v", "seed": 7, "steps": 10, "frames": frames, "fps": fps,
                            "queue_position": None, "extended_from": "video_0"}
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
