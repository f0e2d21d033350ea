"""Shared fixtures: the tiny preset's checkpoint (built once per test session), a throwaway PostgreSQL
server for the session, and an empty job database on SQLite or on that server.

The suite runs on two pytest-xdist workers, a module at a time each (`-n 2 --dist loadfile` in
pyproject.toml): a module's live services (its Ray and Serve application, SeaweedFS) stay within one worker
process, and the modules that take longest are handed out first (`LONGEST_FIRST`), so neither worker is left
with a long module at the end. `-n 0` runs everything in one process, in the same order.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Every test process (and the subprocesses it starts) uses a private cache for built checkpoints.
os.environ.setdefault("PUSA_CACHE_DIR", tempfile.mkdtemp(prefix="pusa-test-cache-"))

from pgserver import PostgresServer, postgres_server_fixture  # noqa: E402

from pusa_model.pipeline import model_folder  # noqa: E402
from pusa_model.presets import get_preset  # noqa: E402

postgres_server = postgres_server_fixture(scope="session")


# The slowest modules on a 2-core machine, slowest first (from `pytest --durations`); the others follow in
# their usual order. Only the order changes: every module runs whole, in one process.
LONGEST_FIRST = (
    "test_control_plane.py",
    "test_batch.py",
    "test_faults.py",
    "test_access.py",
    "test_dit_group.py",
    "test_web.py",
    "test_fuzz.py",
    "test_cli.py",
    "test_client.py",
    "test_observability.py",
    "test_openai_client.py",
    "test_api_limits.py",
    "test_autoscaling.py",
    "test_api_s3.py",
    "test_api.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


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
