"""The runners' sweep: what has outlived its retention is deleted, its stored files first, then its row
(a sweep cut short by a death or an outage leaves the rest for the next one).

- a job, once `expires_at` (set when it ends) has passed: its inputs, results and checkpoints, then its
  row and events;
- a batch, once `retention_ends_at` (set when it ends) has passed: everything under ``batches/<id>/``
  (its stored requests, the pipeline's outputs, its output and error files), then its row and the record
  of its videos (the videos are jobs, each with a retention of its own);
- a file, once `expires_at` has passed (an uploaded input file's is its upload plus the retention, a
  batch's output and error files' the batch's): its bytes, then its row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .batches import BatchStore, batch_folder
from .job_files import JobFiles
from .job_store import JobStore


@dataclass
class Swept:
    """The ids of what one sweep deleted."""

    jobs: list[str] = field(default_factory=list)
    batches: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def sweep_expired(jobs: JobStore, batches: BatchStore, files: JobFiles, limit: int = 100) -> Swept:
    """Delete up to `limit` expired jobs, batches and files each (the oldest first); returns their ids."""
    swept = Swept()
    for job_id in jobs.expired(limit):
        files.delete_all(job_id)
        if jobs.delete_expired(job_id):
            swept.jobs.append(job_id)
    for batch_id in batches.expired(limit):
        files.store.delete_prefix(batch_folder(batch_id))
        if batches.delete_expired(batch_id):
            swept.batches.append(batch_id)
    for stored in batches.expired_files(limit):
        files.store.delete(stored.key)
        if batches.delete_expired_file(stored.id):
            swept.files.append(stored.id)
    return swept
