"""Shared fixtures: the tiny preset's checkpoint (built once per test session), a throwaway PostgreSQL
server for the session, and an empty job database on SQLite or on that server."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# Every test process (and the subprocesses it starts) uses a private cache for built checkpoints.
os.environ.setdefault("PUSA_CACHE_DIR", tempfile.mkdtemp(prefix="pusa-test-cache-"))

from pgserver import PostgresServer, postgres_server_fixture  # noqa: E402

from pusa_model.pipeline import model_folder  # noqa: E402
from pusa_model.presets import get_preset  # noqa: E402

postgres_server = postgres_server_fixture(scope="session")


@pytest.fixture(scope="session")
def tiny_folder() -> Path:
    """The tiny checkpoint in diffusers layout (built on first use)."""
    return model_folder(get_preset("tiny"))


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_folder):
    from pusa_model.pipeline import PusaPipeline

    return PusaPipeline.from_preset("tiny", device="cpu")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty job database: a SQLite file, or a fresh database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Shut down the local Ray the services' modules kept (tests/serving.py), if one was started."""
    serving = sys.modules.get("serving")
    if serving is not None:
        serving.stop_ray()
