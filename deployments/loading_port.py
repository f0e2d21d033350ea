"""The loading state's answers, and `LoadingPort`: the service's HTTP port held by `pusa-serve` itself from its
first second until Serve's proxy listens on it. Standard library only, so that it opens before Ray, Serve
and the model code are imported; it answers from a small process of its own (``python -m
deployments.loading_port FD``), which the launcher's imports cannot stall.

The handover has no gap and drops no connection: the port is bound with ``SO_REUSEPORT``, as Serve's proxy
binds it, so the proxy joins the same port while this one still answers. Then a socket filter on the port
sends every new connection to the proxy (``SO_ATTACH_REUSEPORT_CBPF``), this socket answers what it already
accepted or is still accepting for a moment, and closes. Without the filter, closing a listening socket
resets the connections waiting in its queue.
"""

from __future__ import annotations

import ctypes
import html
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RETRY_AFTER_S = 2
MESSAGE = "The Pusa service is loading its models; retry in a few seconds"
PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta http-equiv="refresh" content="{retry}">
  <title>Pusa video generation: loading</title>
</head>
<body>
  <h1>Pusa video generation</h1>
  <p id="loading">{message}. This page reloads itself every {retry} seconds until the service is ready.</p>
  <p>{detail}</p>
</body>
</html>
"""
SO_ATTACH_REUSEPORT_CBPF = 51  # Linux (asm-generic/socket.h)
BPF_RET_K = 0x06  # a classic BPF program of one instruction: return the constant k


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def loading_reply(path: str, detail: str = "") -> Reply:
    """The 503 for a request to `path` while the service loads: JSON for the API (OpenAI's error shape, code
    ``loading``) and ``/health`` (``{"status": "loading"}``), a self-reloading page for anything else."""
    headers = {"Retry-After": str(RETRY_AFTER_S), "Cache-Control": "no-store"}
    if path == "/health":
        body = {"status": "loading", "detail": detail}
    elif path == "/v1" or path.startswith("/v1/"):
        body = {"error": {"message": MESSAGE, "type": "service_unavailable", "param": None, "code": "loading"}}
    else:
        page = PAGE.format(retry=RETRY_AFTER_S, message=html.escape(MESSAGE), detail=html.escape(detail))
        return Reply(503, {**headers, "Content-Type": "text/html; charset=utf-8"}, page.encode())
    return Reply(503, {**headers, "Content-Type": "application/json"}, json.dumps(body, separators=(",", ":")).encode())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        reply = loading_reply(self.path.split("?", 1)[0], "starting")
        self.send_response(reply.status)
        for name, value in {**reply.headers, "Content-Length": str(len(reply.body)), "Connection": "close"}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)
        self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _answer

    def log_message(self, format: str, *args) -> None:  # no access log on the launcher's stderr
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True


def serve(fd: int) -> None:
    """Answer on the listening socket `fd` until standard input closes (the launcher handed the port over, or
    ended)."""
    server = _Server(("", 0), _Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = socket.socket(fileno=fd)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    sys.stdin.read()
    server.shutdown()


def reachable_host(host: str) -> str:
    """Where this machine reaches a server listening on `host`: loopback for a wildcard address."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def listening(host: str, port: int) -> bool:
    """Whether something accepts connections on `host`:`port` (a wildcard host: on loopback)."""
    try:
        with socket.create_connection((reachable_host(host), port), timeout=1):
            return True
    except OSError:
        return False


class LoadingPort:
    """Answers every request on `host`:`port` with the loading state until `hand_over` (or `close`), from a
    process of its own: the launcher's imports hold its interpreter's lock for seconds at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as Serve's proxy binds it
        self.socket.bind((host, port))
        self.socket.listen(128)
        fd = self.socket.fileno()
        self.process = subprocess.Popen([sys.executable, "-m", "deployments.loading_port", str(fd)], pass_fds=[fd],
                                        stdin=subprocess.PIPE)

    @classmethod
    def open(cls, host: str, port: int) -> LoadingPort | None:
        """The port held from now, or None where it cannot be: not Linux (no handover without a gap), something
        already listening there (a running service: it keeps its port), or the bind failing."""
        if not sys.platform.startswith("linux") or listening(host, port):
            return None
        try:
            return cls(host, port)
        except OSError:
            return None

    def hand_over(self, drain_s: float = 1.0) -> None:
        """Send every new connection to the other socket on the port (Serve's proxy, bound after this one),
        answer those already here for `drain_s` seconds, and close."""
        program = ctypes.create_string_buffer(struct.pack("HBBI", BPF_RET_K, 0, 0, 1))  # the second socket: the proxy
        fprog = struct.pack("HP", 1, ctypes.addressof(program))  # struct sock_fprog {len, filter}
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
        except OSError:  # no filter: the handover is a plain close, as before a proxy that came late
            pass
        time.sleep(drain_s)
        self.close()

    def close(self) -> None:
        """Stop answering and release the port."""
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.socket.close()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
