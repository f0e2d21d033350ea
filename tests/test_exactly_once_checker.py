"""The fixed seeds of the exactly-once checker (tests/exactly_once_checker.py) on SQLite and PostgreSQL:
random histories of runners claiming, dying, draining, losing connections before and after commits, and of
outages, cancels, deletes and sweeps, each checked against the promises of docs/design.md. A long run:
``python -m tests.exactly_once_checker --histories 10000``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from exactly_once_checker import Checker, references, run_histories, virtual_clock
from pusa_jobs.db import open_database
from pusa_jobs.storage import LocalStore

SEEDS = {"sqlite": range(0, 50), "postgresql": range(0, 50)}
MUTATION_SEEDS = [80]  # a history known to catch the broken fence below on both databases (the first of 0..399)


def test_fixed_seeds_keep_every_promise(database_url: str, tmp_path: Path) -> None:
    dialect = "sqlite" if database_url.startswith("sqlite") else "postgresql"
    assert run_histories(database_url, tmp_path / "store", SEEDS[dialect]) == len(SEEDS[dialect])


def test_a_history_replays_to_the_same_actions(database_url: str, tmp_path: Path) -> None:
    """A seed names its history: the same actions and faults, in the same order (job ids aside)."""
    db = open_database(database_url)
    store = LocalStore(tmp_path / "store")
    try:
        refs = references(db, store)
        histories = []
        with virtual_clock():
            for _ in range(2):
                checker = Checker(7, db, store, refs)
                checker.run()
                histories.append(checker.history)
        assert histories[0] == histories[1] and len(histories[0]) > 5
    finally:
        db.dispose()


@pytest.mark.parametrize("mutation", ["accept-any-retry"])
def test_the_checker_finds_a_broken_fence(database_url: str, tmp_path: Path, mutation: str, monkeypatch) -> None:
    """The checker is not blind: with the store's recognition of a retried write broken (a write that
    matched no row is taken for applied, whoever holds the lease now), a fenced-out runner believes its
    final write went through and deletes the checkpoint the job's next holder resumes from."""
    from pusa_jobs.job_store import JobStore

    def accept_any(self, conn, lease, event, write_id, keeps_lease):  # the bug: no check of the lease
        from sqlalchemy import select

        from pusa_jobs.job_store import _SIGNALS
        from pusa_jobs.schema import jobs
        return conn.execute(select(*_SIGNALS).where(jobs.c.id == lease.job_id)).first()

    monkeypatch.setattr(JobStore, "_already_applied", accept_any)
    with pytest.raises(AssertionError):
        run_histories(database_url, tmp_path / "store", MUTATION_SEEDS)


# Histories the checker found breaking a promise, kept as regression tests once the code was fixed.
REGRESSIONS = {
    # A runner's lease lapses while it computes a step; another runner adopts the job, the job is deleted
    # and the adopter removes it entirely. The first runner then stores its step's checkpoint (1228) or
    # the finished video (1392) and is told LeaseLost: the file stayed in the store for good (no row, so
    # no sweep). Now a run that loses its lease removes the files of a job that is gone or going.
    1228: "a fenced-out runner's checkpoint written after the job was deleted",
    1392: "a fenced-out runner's video written after the job was deleted",
    # The checker's own false alarm in the long run: a job deleted as it completed, whose holder removed
    # its files and died before removing its row, is hidden and swept later; its video is rightly gone.
    101182: "a completed job deleted, its files gone, its row left for the sweep",
}


@pytest.mark.parametrize("seed", sorted(REGRESSIONS))
def test_regression_seeds(database_url: str, tmp_path: Path, seed: int) -> None:
    assert run_histories(database_url, tmp_path / "store", [seed]) == 1
