"""`pusa-serve` answers HTTP from its first second: 503 "loading" (with Retry-After) on the API, /health and
the web page until every deployment runs, then 200 — never a 404, a 502, a hang or a refused connection; and,
once a batch has run, a SIGTERM ends it cleanly (exit status 0)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import yaml

from serving import free_port, local_config

ROOT = Path(__file__).resolve().parent.parent
DIT_START_DELAY_S = 4  # the DiT starts this much later than the rest: the real Router's loading state is seen
PATHS = ("/v1/models", "/", "/health")
PORT_OPEN_WITHIN_S = 5  # Python's start and the YAML config's read; Ray's start alone takes longer


def test_start_answers_loading_then_ready(tmp_path, tiny_folder):
    port = free_port()
    config = local_config(str(tmp_path / "store"), port, args={"dit_start_delay_s": DIT_START_DELAY_S})
    config["applications"][0]["import_path"] = "slow_start_app:build_app"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    started = time.monotonic()
    proc = subprocess.Popen([str(ROOT / ".venv/bin/pusa-serve"), str(tmp_path / "config.yaml")], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    output: list[str] = []
    ready_at: list[float] = []

    def read() -> None:
        for line in proc.stdout:
            output.append(line)
            if line.startswith("Pusa service ready at") and not ready_at:
                ready_at.append(time.monotonic())
    threading.Thread(target=read, daemon=True).start()

    seen: list[tuple[float, str, httpx.Response]] = []  # (time since start, path, response) once the port is open
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=2.0) as http:
            deadline = started + 150
            while not ready_at or time.monotonic() < ready_at[0] + 1:
                assert time.monotonic() < deadline, "".join(output[-30:])
                assert proc.poll() is None, "".join(output[-30:])
                for path in PATHS:
                    try:
                        response = http.get(path)  # a request past 2 s raises: no request may hang
                    except httpx.ConnectError:
                        assert not seen, f"{path}: connection refused after the port had opened"
                        continue
                    seen.append((time.monotonic() - started, path, response))
                time.sleep(0.2)
            batch = run_a_batch(http)
    finally:
        proc.send_signal(signal.SIGTERM)  # as a service manager stops it, after a batch: a clean end, exit status 0
        try:
            exit_status = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            exit_status = None
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever Ray left behind in the session
        except ProcessLookupError:  # nothing left
            pass
    assert exit_status == 0, "".join(output[-30:])
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 1, batch

    statuses = [(round(t, 1), path, r.status_code) for t, path, r in seen]
    assert seen[0][0] < PORT_OPEN_WITHIN_S, statuses[:3]  # the launcher holds the port before Ray starts
    first_200 = min(t for t, _, r in seen if r.status_code == 200)
    print(f"port open at {seen[0][0]:.1f} s, first 200 at {first_200:.1f} s, ready line at {ready_at[0] - started:.1f} s; "
          f"{sum(r.status_code == 503 for _, _, r in seen)} 503s, {sum(r.status_code == 200 for _, _, r in seen)} 200s")
    assert {r.status_code for _, _, r in seen} <= {200, 503}, statuses
    for path in PATHS:
        codes = [r.status_code for _, p, r in seen if p == path]
        assert codes[0] == 503 and codes[-1] == 200, (path, codes)
        assert codes == sorted(codes, reverse=True), (path, codes)  # 503s, then only 200s
    for _, path, r in seen:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "2", (path, r.headers)
    loading = {path: [r for _, p, r in seen if p == path and r.status_code == 503] for path in PATHS}
    for r in loading["/v1/models"]:
        assert r.json()["error"]["code"] == "loading" and r.json()["error"]["type"] == "service_unavailable", r.text
    for r in loading["/health"]:
        assert r.json()["status"] == "loading", r.text
    for r in loading["/"]:
        assert r.headers["content-type"].startswith("text/html")
        assert "is loading its models" in r.text and '<meta http-equiv="refresh"' in r.text
    # the real Router's own loading state, waiting for the slow DiT (not only the first, light Router's)
    assert any("waiting for DiT" in r.json()["detail"] for r in loading["/health"]), [r.text for r in loading["/health"]]
    ready = [r for _, p, r in seen if p == "/" and r.status_code == 200]
    assert "<title>Pusa video generation</title>" in ready[-1].text and "loading its models" not in ready[-1].text
    assert [r.json()["data"][0]["id"] for _, p, r in seen if p == "/v1/models" and r.status_code == 200][-1] == "pusa-v1"
    # every response after the ready line is a 200
    assert all(r.status_code == 200 for t, _, r in seen if t > ready_at[0] - started), statuses


def run_a_batch(http: httpx.Client, timeout: float = 240) -> dict:
    """A one-request batch through the Files and Batch APIs, to its end; returns the batch object."""
    line = {"custom_id": "one", "method": "POST", "url": "/v1/videos", "body": {"prompt": "a cat", "steps": 1}}
    upload = http.post("/v1/files", data={"purpose": "batch"},
                       files={"file": ("in.jsonl", json.dumps(line).encode() + b"\n", "application/jsonl")}, timeout=30)
    assert upload.status_code == 200, upload.text
    batch = http.post("/v1/batches", json={"input_file_id": upload.json()["id"], "endpoint": "/v1/videos",
                                           "completion_window": "24h"}, timeout=30).json()
    deadline = time.monotonic() + timeout
    while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.5)
        batch = http.get(f"/v1/batches/{batch['id']}", timeout=30).json()
    return batch
