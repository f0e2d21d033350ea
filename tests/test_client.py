"""`pusa client` against the local profile with API keys on (a real local Ray, one service for the module):
every command, its exit codes (completed, cancelled, a refused request, a bad key, no service), a watched
stream resumed after a dropped connection, and the README's client and `openai` examples run as written."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
from videoapi import image_bytes, mp4_bytes

from pusa_cli import main
from pusa_client.http import Api
from pusa_jobs.api_keys import KeyStore
from pusa_jobs.db import open_database
from pusa_jobs.job_files import JobFiles
from pusa_jobs.job_store import JobStore
from pusa_jobs.jobs import Job, job_created_at, new_job_id
from pusa_jobs.storage import open_store
from pusa_model.media import probe_video
from pusa_model.request import parse_request
from serving import free_port, running_service

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--steps", "2", "--frames", "9"]  # a job of about a second on the tiny preset
BIG = ["--size", "1024x1024", "--frames", "1"]  # DiT steps of ~0.3 s on a CPU core
SLOW = [*BIG, "--steps", "40"]


@dataclass
class Service:
    url: str
    key: str  # a user key's secret
    owner: str  # its id, the owner of its jobs
    jobs: JobStore
    files: JobFiles


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Service:
    """The service with keys on and a user key, whose URL and secret are PUSA_URL and PUSA_API_KEY for the
    module."""
    folder = tmp_path_factory.mktemp("client")
    database = f"sqlite:///{folder / 'jobs.db'}"
    with running_service(str(folder / "store"), api={"auth": "keys"}, database=database) as url:
        db = open_database(database)
        key, secret = KeyStore(db).create("client-tests")
        with pytest.MonkeyPatch.context() as env:
            env.setenv("PUSA_URL", url)
            env.setenv("PUSA_API_KEY", secret)
            yield Service(url, secret, key.id, JobStore(db), JobFiles(open_store(str(folder / "store"))))


def pusa(*args: str) -> subprocess.CompletedProcess:
    """`pusa client ARGS` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["client", *map(str, args)])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def error_line(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def is_mp4(path: Path, frames: int, size: tuple[int, int] = (64, 64)) -> bool:
    info = probe_video(path)
    return path.read_bytes()[4:8] == b"ftyp" and (info["width"], info["height"], info["frames"]) == (*size, frames)


@pytest.fixture(scope="module")
def t2v(service, tmp_path_factory) -> str:
    """A completed t2v job made with `submit --wait -o`."""
    out = tmp_path_factory.mktemp("t2v") / "cat.mp4"
    res = pusa("submit", "--prompt", "a cat walks on the grass", "--steps", "2", "--seed", "3", "--size", "64x48",
               "--wait", "-o", out)
    assert res.returncode == 0, res.stderr
    video_id = res.stdout.splitlines()[0]
    assert re.fullmatch(r"video_[0-9a-f]{24}", video_id), res.stdout
    assert "2/2" in res.stderr and f"{video_id} completed" in res.stderr and f"wrote {out}" in res.stderr
    assert is_mp4(out, 17, (64, 48))
    return video_id


def test_submit_wait_downloads_the_video(t2v):
    res = pusa("get", t2v)
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout)
    assert job["status"] == "completed" and job["size"] == "64x48" and job["prompt"] == "a cat walks on the grass"
    assert (job["pusa"]["task"], job["pusa"]["steps"], job["pusa"]["seed"]) == ("t2v", 2, 3)


def test_i2v_upload_then_watch_and_download(service, tmp_path, monkeypatch):
    (tmp_path / "start.png").write_bytes(image_bytes("PNG", size=(96, 72)))
    monkeypatch.chdir(tmp_path)
    res = pusa("submit", "--image", "start.png", "--prompt", "the camera pans", "--noise-multiplier", "0.3",
               "--seed", "8", *TINY, "--json")
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout)
    assert job["status"] == "queued" and job["pusa"]["task"] == "i2v" and job["pusa"]["seed"] == 8

    watched = pusa("watch", job["id"], "--json")
    assert watched.returncode == 0, watched.stderr
    assert json.loads(watched.stdout)["status"] == "completed" and "2/2" in watched.stderr

    saved = pusa("download", job["id"])
    assert saved.returncode == 0 and saved.stdout.strip() == f"{job['id']}.mp4", saved.stderr
    assert is_mp4(tmp_path / f"{job['id']}.mp4", 9)
    thumb = pusa("download", job["id"], "--variant", "thumbnail", "-o", "thumb.webp")
    assert thumb.returncode == 0, thumb.stderr
    data = (tmp_path / "thumb.webp").read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"


@pytest.mark.parametrize("task_args,frames", [
    (["--image", "a.png", "--image", "b.jpg", "--positions", "0,2", "--multipliers", "0.2,0.5"], 9),
    (["--task", "v2v", "--video", "clip.mp4", "--positions", "0,2", "--multipliers", "0.3,0.3"], 9),
    (["--video", "{t2v}", "--v2v-mode", "extension", "--video-anchor", "end", "--frames", "17"], 17),
], ids=["keyframes", "v2v-upload", "v2v-of-a-job"])
def test_other_tasks(t2v, tmp_path, monkeypatch, task_args, frames):
    (tmp_path / "a.png").write_bytes(image_bytes("PNG", seed=1))
    (tmp_path / "b.jpg").write_bytes(image_bytes("JPEG", seed=2))
    (tmp_path / "clip.mp4").write_bytes(mp4_bytes(17, seed=2))
    monkeypatch.chdir(tmp_path)
    args = [a.format(t2v=t2v) for a in task_args]
    res = pusa("submit", "--prompt", "keyframes", *TINY, *args, "--wait", "--json", "-o", "out.mp4")
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout)
    assert job["status"] == "completed" and job["pusa"]["task"] == ("multi_frame" if "a.png" in args else "v2v")
    assert is_mp4(tmp_path / "out.mp4", frames)


def test_extend_a_completed_video(t2v, tmp_path):
    res = pusa("extend", t2v, "--prompt", "and then it runs", "--steps", "2", "--wait", "--json",
               "-o", tmp_path / "longer.mp4")
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout)
    assert job["status"] == "completed" and job["pusa"]["extended_from"] == t2v and job["pusa"]["task"] == "v2v"
    assert is_mp4(tmp_path / "longer.mp4", 17)  # the preset's size unless --size says otherwise


def test_a_long_video_from_an_upload_and_its_windows(service, tmp_path, monkeypatch):
    (tmp_path / "start.png").write_bytes(image_bytes("PNG", seed=4))
    monkeypatch.chdir(tmp_path)
    res = pusa("submit", "--image", "start.png", "--prompt", "a long pan", "--steps", "1", "--size", "64x48",
               "--frames", "25", "--window-frames", "17", "--extension-multipliers", "0,0.2,0.3,0.4", "--wait", "--json",
               "-o", "long.mp4")
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout)
    assert job["status"] == "completed" and job["pusa"]["windows"] == 3 and job["pusa"]["frames"] == 25
    assert "window 3 of 3 done" in res.stderr and "3/3" in res.stderr
    assert is_mp4(tmp_path / "long.mp4", 25, (64, 48))  # 17 frames, then 4 more from each later window
    saved = pusa("download", job["id"], "--segment", "1", "-o", "window.mp4")
    assert saved.returncode == 0, saved.stderr
    assert is_mp4(tmp_path / "window.mp4", 17, (64, 48))
    missing = pusa("download", job["id"], "--segment", "3", "-o", "none.mp4")
    assert missing.returncode == 2 and "segment" in error_line(missing)


def test_list_pages(t2v):
    mine = [pusa("submit", "--prompt", f"list {i}", "--steps", "1", "--frames", "5").stdout.strip() for i in range(3)]
    first = pusa("list", "--limit", "2", "--json")
    assert [job["id"] for job in json.loads(first.stdout)] == mine[:0:-1]
    everything = [job["id"] for job in json.loads(pusa("list", "--limit", "2", "--all", "--json").stdout)]
    assert everything[:3] == mine[::-1] and t2v in everything
    assert everything == sorted(set(everything), reverse=True)
    after = pusa("list", "--limit", "1", "--after", mine[2])
    assert after.returncode == 0 and after.stdout.split()[0] == mine[1], after.stdout
    for video_id in mine:
        assert pusa("watch", video_id).returncode == 0


def test_cancelled_job_exits_3_and_delete(service):
    waiting = subprocess.Popen([sys.executable, "-m", "pusa_cli", "client", "submit", "--prompt", "slow", *SLOW,
                                "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    video_id = waiting.stdout.readline().strip()
    with Api(service.url, service.key) as api:
        deadline = time.monotonic() + 60
        while api.get(video_id)["progress"] < 4 and time.monotonic() < deadline:  # a step or more done
            time.sleep(0.1)
    cancelled = pusa("cancel", video_id)
    assert cancelled.returncode == 0 and cancelled.stdout.split()[0] == video_id, cancelled.stderr
    assert waiting.wait(timeout=60) == 3
    assert f"{video_id} cancelled" in waiting.stderr.read()

    deleted = pusa("delete", video_id)
    assert deleted.returncode == 0 and deleted.stdout.strip() == f"{video_id} deleted"
    gone = pusa("get", video_id)
    assert gone.returncode == 2 and error_line(gone) == f"pusa client: error: video_id: no video with id '{video_id}'"


def test_failed_job_exits_1(service):
    """A job whose stored image cannot be read (the API checks uploads, so it is made in the job database)
    fails in the runner; watching it exits 1 with the job's error."""
    job_id = new_job_id()
    request = parse_request({"task": "i2v", "prompt": "p", "images": ["images[0]"], "frames": 5, "steps": 2})
    plan = {"width": 64, "height": 64, "frames": 5, "fps": 25, "seed": 1, "steps": 2, "task": "i2v", "latent_frames": 2}
    service.jobs.create(Job(id=job_id, owner=service.owner, created_at=job_created_at(job_id),
                            request=request.model_dump(), plan=plan,
                            inputs={"images[0]": service.files.put_input(job_id, "images[0]", b"not an image")}),
                        {"type": "queued", "position": 1})
    res = pusa("watch", job_id)
    assert res.returncode == 1
    assert f"{job_id} failed: invalid_request: images[0]: cannot read image" in res.stderr


@pytest.mark.parametrize("args,line", [
    (["--steps", "99"], "steps: Input should be less than or equal to 50"),
    (["--size", "100x64"], "size: width and height must be multiples of 16 from 16 to 1920, got 100x64"),
    (["--guidance", "0.5"], "guidance: "),
    (["--lora-alpha", "9"], "lora_alpha: "),
    (["--noise-multiplier", "2"], "noise_multiplier: "),
    (["--fps", "0"], "fps: "),
    (["--negative-prompt", "x" * 4001], "negative_prompt: "),
    (["--webhook-url", "ftp://example.com"], "webhook_url: "),
    (["--image", "a.png", "--image", "a.png", "--positions", "0,100", "--pixel-positions", "--frames", "9"],
     "positions: pixel frame 100 is outside 0..8"),
    (["--image", "/nonexistent/x.png"], "images: cannot read /nonexistent/x.png: No such file or directory"),
    (["--lora", "nope=1.0"], "loras[0].name: "),
    (["--image", "a.png", "--lora", "nope"], "loras[0].name: "),  # multipart carries loras as JSON
    (["--model", "pusa-wan2.2"], "model: model 'pusa-wan2.2' is not served by this deployment (served: pusa-v1)"),
], ids=["steps", "size", "guidance", "lora-alpha", "noise-multiplier", "fps", "negative-prompt", "webhook-url",
        "pixel-positions", "missing-file", "lora", "lora-multipart", "model"])
def test_refused_request_is_one_line_naming_the_field(service, tmp_path, monkeypatch, args, line):
    """Each option reaches the API under its field's name: the API's refusal names it."""
    (tmp_path / "a.png").write_bytes(image_bytes("PNG"))
    monkeypatch.chdir(tmp_path)
    res = pusa("submit", "--prompt", "p", *args)
    assert res.returncode == 2 and res.stdout == ""
    assert error_line(res).startswith(f"pusa client: error: {line}")


def test_seconds_fps_and_idempotency_key(service):
    args = ["submit", "--prompt", "once", "--seconds", "0.4", "--fps", "10", "--steps", "1",
            "--idempotency-key", f"client-test-{time.time()}", "--json"]
    first, again = (json.loads(pusa(*args).stdout) for _ in range(2))
    assert again["id"] == first["id"] and (first["pusa"]["frames"], first["pusa"]["fps"]) == (5, 10)
    assert pusa("watch", first["id"]).returncode == 0


def test_fast_mode(service):
    job = json.loads(pusa("submit", "--prompt", "quick", "--fast", "--json").stdout)
    assert job["pusa"]["steps"] == 4  # the fast mode's steps (the tiny service has no distill LoRA to add)
    assert pusa("watch", job["id"]).returncode == 0


def test_bad_api_key_and_no_service(service):
    res = pusa("list", "--api-key", "pusa-not-a-key")
    assert res.returncode == 2
    assert error_line(res) == "pusa client: error: the API key is not valid or was revoked"
    res = pusa("get", "video_x", "--url", f"http://127.0.0.1:{free_port()}")
    assert res.returncode == 4 and error_line(res).startswith("pusa client: error: cannot reach the service: ")


class DroppingProxy:
    """A TCP proxy to the service that cuts the first event stream once a step event went through, and
    keeps the head of every event-stream request and what went through before the cut."""

    def __init__(self, upstream: str) -> None:
        self.upstream = ("127.0.0.1", int(upstream.rsplit(":", 1)[1]))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.requests: list[str] = []
        self.before_cut: str | None = None
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self.upstream)
            stream: dict = {"events": False}
            threading.Thread(target=self._up, args=(client, upstream, stream), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, stream), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, stream: dict) -> None:
        try:
            while data := client.recv(65536):
                if b"/events " in data:
                    self.requests.append(data.decode(errors="replace"))
                    stream["events"] = True
                upstream.sendall(data)
        except OSError:
            pass

    def _down(self, upstream: socket.socket, client: socket.socket, stream: dict) -> None:
        relayed = b""
        try:
            while data := upstream.recv(65536):
                client.sendall(data)
                if stream["events"] and self.before_cut is None:
                    relayed += data
                    if b"event: step" in relayed:
                        self.before_cut = relayed.decode()
                        break
        except OSError:
            pass
        for sock in (client, upstream):  # shutdown: a close alone leaves the socket to the other thread's recv
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def test_watch_resumes_after_a_dropped_connection(service):
    video_id = pusa("submit", "--prompt", "waves", *BIG, "--steps", "4").stdout.strip()
    proxy = DroppingProxy(service.url)
    try:
        res = pusa("watch", video_id, "--url", proxy.url)
    finally:
        proxy.server.close()
    assert res.returncode == 0 and "4/4" in res.stderr and f"{video_id} completed" in res.stderr, res.stderr
    assert proxy.before_cut is not None and "event: completed" not in proxy.before_cut  # cut mid-job
    last_id = re.findall(r"^id: (\d+)$", proxy.before_cut, re.MULTILINE)[-1]
    assert len(proxy.requests) >= 2 and "last-event-id" not in proxy.requests[0].lower()
    assert f"last-event-id: {last_id}\r\n" in proxy.requests[1].lower()


def readme_block(first_line_part: str, language: str) -> str:
    """The README's fenced `language` block that contains `first_line_part`."""
    blocks = re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    return next(block for block in blocks if first_line_part in block)


def test_readme_client_example(service, tmp_path):
    """The README's first client block, pasted into a shell in a folder with the project's .venv."""
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    script = readme_block("pusa client submit", "bash")
    res = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for name in ("cat.mp4", "waves.mp4"):
        assert (tmp_path / name).read_bytes()[4:8] == b"ftyp"


def test_readme_openai_example(service, tmp_path):
    """The README's `openai` block, run as a script with the installed openai package."""
    (tmp_path / "start.png").write_bytes(image_bytes("PNG"))
    script = readme_block("from openai import", "python")
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "DeprecationWarning: The Sora API is scheduled" in res.stderr  # the SDK's word on its video methods
    assert (tmp_path / "cat.mp4").read_bytes()[4:8] == b"ftyp"
    with Api(service.url, service.key) as api:
        jobs = api.list(100)["data"]
    extension = next(job for job in jobs if job["prompt"] == "and then it rains")
    assert extension["pusa"]["extended_from"] is not None and extension["pusa"]["task"] == "v2v"
