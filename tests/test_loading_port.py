"""`LoadingPort`: the port answers the loading state until a second server joins it with SO_REUSEPORT (as Serve's
proxy does), and the handover to that server drops no connection."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from deployments.loading_port import LoadingPort, loading_reply
from serving import free_port


class Ready(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args) -> None:
        pass


class Proxy(ThreadingHTTPServer):  # binds as Serve's proxy does
    allow_reuse_address = True
    allow_reuse_port = True
    daemon_threads = True


def test_the_loading_answers_of_each_path():
    health = loading_reply("/health", "starting")
    assert health.status == 503 and health.headers["Retry-After"] == "2"
    assert health.body == b'{"status":"loading","detail":"starting"}'
    api = loading_reply("/v1/videos")
    assert api.headers["Content-Type"] == "application/json" and b'"code":"loading"' in api.body
    page = loading_reply("/", "<b>")
    assert page.headers["Content-Type"].startswith("text/html")
    assert b"is loading its models" in page.body and b"&lt;b&gt;" in page.body


def test_a_handover_to_a_server_joining_the_port_drops_no_connection():
    port = free_port()
    held = LoadingPort.open("127.0.0.1", port)
    assert held is not None
    assert LoadingPort.open("127.0.0.1", port) is None  # a port something listens on is left to it
    answers: list[int | str] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:  # a new connection each time: each one is placed on one of the port's sockets
                with httpx.Client(timeout=2) as http:
                    answers.append(http.get(f"http://127.0.0.1:{port}/v1/models").status_code)
            except httpx.HTTPError as exc:
                answers.append(repr(exc))

    pollers = [threading.Thread(target=poll) for _ in range(4)]
    for thread in pollers:
        thread.start()
    proxy = Proxy(("127.0.0.1", port), Ready)
    threading.Thread(target=proxy.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        while answers.count(503) < 20 or answers.count(200) < 20:  # both sockets answer, in any order
            assert all(isinstance(a, int) for a in answers), answers
            time.sleep(0.01)
        held.hand_over(drain_s=0.5)
        handed_over = len(answers)
        while len(answers) < handed_over + 100:
            time.sleep(0.01)
    finally:
        stop.set()
        for thread in pollers:
            thread.join()
        proxy.shutdown()
        proxy.server_close()
    assert all(isinstance(a, int) for a in answers), [a for a in answers if not isinstance(a, int)][:3]
    assert set(answers[handed_over + len(pollers):]) == {200}  # once closed, only the proxy answers


def test_pusa_serve_imports_neither_ray_nor_torch_before_its_port_is_held():
    code = ("import sys, deployments.serve_command; "
            "print(sorted(m for m in ('ray', 'torch', 'diffusers', 'starlette') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
