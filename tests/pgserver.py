"""A real throwaway PostgreSQL server for tests: its own cluster in a temp folder, on a free loopback port.

The binaries come from ``$PUSA_PG_BIN``, else the newest ``/usr/lib/postgresql/*/bin`` (Debian's
``postgresql`` package, installed by ``scripts/install.sh``), else the folder of ``pg_ctl`` on PATH.
PostgreSQL refuses to run as root: under root the server runs as the ``postgres`` system user
(``nobody`` if there is none), in folders made with ``tempfile.mkdtemp`` and given to that user.
The cluster trusts every local connection as the superuser ``pusa`` and trades durability for speed
(``fsync``, ``synchronous_commit`` and ``full_page_writes`` off).

Use ``start_postgres_server()`` (call ``.close()``), the ``running_postgres_server`` context manager,
or ``postgres_server_fixture()`` to define a pytest fixture in a conftest or test module::

    postgres_server = postgres_server_fixture(scope="session")

    def test_something(postgres_server):
        url = postgres_server.create_database()  # a fresh database per test
        engine = sqlalchemy.create_engine(url)

``stop()`` / ``start()`` / ``restart()`` shut the server down and bring it back on the same data and
the same port, so clients can reconnect (pooled connections do not survive: use ``pool_pre_ping``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

USER = "pusa"
DATABASE = "pusa"
HOST = "127.0.0.1"
_BINARIES = ("pg_ctl", "initdb", "postgres")


def pg_bin_dir() -> Path:
    """The folder holding `pg_ctl`, `initdb` and `postgres`: $PUSA_PG_BIN, Debian's newest, or PATH's."""
    if os.environ.get("PUSA_PG_BIN"):
        folder = Path(os.environ["PUSA_PG_BIN"])
        if not all((folder / b).is_file() for b in _BINARIES):
            raise RuntimeError(f"PUSA_PG_BIN={folder} lacks one of {', '.join(_BINARIES)}")
        return folder

    def version(folder: Path) -> tuple[int, ...]:
        name = folder.parent.name
        return tuple(int(part) for part in name.split(".")) if name.replace(".", "").isdigit() else (0,)

    debian = [d for d in Path("/usr/lib/postgresql").glob("*/bin") if all((d / b).is_file() for b in _BINARIES)]
    if debian:
        return max(debian, key=version)
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    raise RuntimeError("PostgreSQL server binaries (pg_ctl, initdb, postgres) not found: run scripts/install.sh")


def _server_user() -> pwd.struct_passwd | None:
    """The account the server runs as when we are root (None when we are not: it runs as us)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a `postgres` nor a `nobody` user exists to run PostgreSQL")


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class PostgresServer:
    """A PostgreSQL cluster in a temp folder, served on `host`:`port` to the superuser `user`."""

    host: str
    port: int
    user: str
    bin_dir: Path
    base_dir: Path  # the mkdtemp folder: data/, sock/ and the log
    run_as: pwd.struct_passwd | None = None

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "sock"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "postgres.log"

    def url(self, database: str = DATABASE) -> str:
        """The SQLAlchemy URL of `database` on this server (psycopg 3 driver)."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def connect(self, database: str = DATABASE, **kwargs) -> psycopg.Connection:
        """A psycopg connection to `database` (the caller closes it)."""
        return psycopg.connect(host=self.host, port=self.port, user=self.user, dbname=database, **kwargs)

    def create_database(self, name: str | None = None) -> str:
        """Create database `name` (a fresh random `t_<hex>` when None) and return its SQLAlchemy URL."""
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        with self.connect("postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def _run(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run a server binary as the server's user; output captured, PG* variables left out."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        kwargs = {}
        if self.run_as is not None:
            kwargs = {"user": self.run_as.pw_uid, "group": self.run_as.pw_gid, "extra_groups": []}
            env["HOME"] = str(self.base_dir)
        result = subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            cwd=self.base_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed ({result.returncode}): {result.stdout}{result.stderr}\n"
                f"log {self.log_path}:\n{self.log_tail()}"
            )
        return result

    def _write_config(self) -> None:
        """Listen address, port, socket folder and the speed settings, in data/pusa.conf."""
        settings = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
        }
        conf = self.data_dir / "pusa.conf"
        conf.write_text("".join(f"{key} = {value}\n" for key, value in settings.items()))
        if self.run_as is not None:
            os.chown(conf, self.run_as.pw_uid, self.run_as.pw_gid)

    def _try_start(self, timeout: float) -> bool:
        """`pg_ctl start`, then one successful connection; False if the server did not come up."""
        deadline = time.monotonic() + timeout
        result = self._run(
            "pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_path), "-w", "-t", str(int(timeout)),
            check=False, timeout=timeout + 10,
        )
        if result.returncode != 0:
            return False
        while time.monotonic() < deadline:
            try:
                with self.connect("postgres", connect_timeout=2):
                    return True
            except psycopg.OperationalError:
                time.sleep(0.05)
        return False

    def start(self, timeout: float = 30.0) -> None:
        """Start the server on its data folder and port and wait until it accepts connections."""
        if self.is_running():
            return
        if not self._try_start(timeout):
            self.stop()
            raise RuntimeError(
                f"PostgreSQL did not accept connections on {self.host}:{self.port} within {timeout:g}s "
                f"({self.log_path}):\n{self.log_tail()}"
            )

    def is_running(self) -> bool:
        """Whether a postmaster is alive on this data folder (`pg_ctl status`)."""
        return self._run("pg_ctl", "status", "-D", str(self.data_dir), check=False).returncode == 0

    def stop(self) -> None:
        """Fast shutdown (open sessions are ended, no waiting for clients), waiting until it is down."""
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60", check=False)

    def restart(self, timeout: float = 30.0) -> None:
        """Stop, then start again on the same data and port."""
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        """Stop the server and remove its folders."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)


def start_postgres_server(timeout: float = 30.0, attempts: int = 3) -> PostgresServer:
    """initdb a cluster in a new temp folder, start it on a free loopback port, create database `pusa`.

    A start that fails because the chosen port was taken meanwhile is retried on a new port; any
    other failure raises with the log tail. Call `.close()` to stop it and remove its folders.
    """
    bin_dir = pg_bin_dir()
    run_as = _server_user()
    base = Path(tempfile.mkdtemp(prefix="pusa-pg-"))
    server = PostgresServer(HOST, 0, USER, bin_dir, base, run_as)
    try:
        server.socket_dir.mkdir()
        if run_as is not None:
            for folder in (base, server.socket_dir):
                os.chown(folder, run_as.pw_uid, run_as.pw_gid)
        server._run(
            "initdb", "-D", str(server.data_dir), "-A", "trust", "-U", USER, "--no-sync", "-E", "UTF8",
            "--locale=C", "--no-instructions",
        )
        with open(server.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\ninclude_if_exists = 'pusa.conf'\n")
        for attempt in range(attempts):
            server.port = free_port()
            server._write_config()
            if server._try_start(timeout):
                break
            server.stop()
            taken = "Address already in use" in server.log_tail(20)
            if not taken or attempt == attempts - 1:
                raise RuntimeError(
                    f"PostgreSQL did not start on {HOST}:{server.port} within {timeout:g}s "
                    f"(attempt {attempt + 1}/{attempts}, {server.log_path}):\n{server.log_tail()}"
                )
        server.create_database(DATABASE)
    except BaseException:
        server.close()
        raise
    return server


@contextmanager
def running_postgres_server(timeout: float = 30.0) -> Iterator[PostgresServer]:
    """Context manager around `start_postgres_server`; the server is stopped and removed on exit."""
    server = start_postgres_server(timeout)
    try:
        yield server
    finally:
        server.close()


def postgres_server_fixture(scope: str = "session"):
    """A pytest fixture (of `scope`) yielding a running `PostgresServer`; assign it to a module-level name."""

    @pytest.fixture(scope=scope)
    def postgres_server() -> Iterator[PostgresServer]:
        with running_postgres_server() as server:
            yield server

    return postgres_server
