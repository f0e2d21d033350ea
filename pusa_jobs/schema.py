"""The job database's tables (SQLAlchemy Core). Alembic's migrations under `migrations/` create them;
a test keeps the two in step.

- ``jobs``: one row per video job: its request, status, lease (holder, epoch, expiry), checkpoint
  pointer, flags set by other replicas (cancel, delete, a streaming client's deadline) and retention.
- ``job_events``: the job's progress events, append-only, numbered 0, 1, ... per job.
- ``webhook_deliveries``: the outbox of signed webhook calls, written in the transaction that ends a job.
- ``api_keys``: API keys (only their SHA-256), each with a role and optional quotas of its own.
- ``usage``: what each key was charged per accepted job (its cost estimate), kept a day for its quotas;
  deleting a job does not remove its charge.
- ``files``: uploaded batch input files and the output and error files of batches (OpenAI's Files API);
  the bytes are in the blob store under ``key``.
- ``batches``: batches of video requests (OpenAI's Batch API): status and its times, the request
  counts, the result files, and the lease of the runner that drives the batch's Ray Data pipeline.
- ``batch_videos``: the rows of a batch whose video was registered (a job of the batch's owner), written
  with the video: a row's video is made once, and not again once its owner deleted it.
"""

from __future__ import annotations

from sqlalchemy import JSON, Boolean, Column, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text, false

metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("owner", String(128), nullable=False, server_default=""),  # who submitted it ("" without keys)
    Column("created_at", Float, nullable=False),
    Column("status", String(16), nullable=False),
    Column("progress", Integer, nullable=False, server_default="0"),
    Column("model", String(64), nullable=False),
    Column("request", JSON, nullable=False),
    Column("plan", JSON, nullable=False),
    Column("inputs", JSON, nullable=False),
    Column("error", JSON),
    Column("extended_from", String(64)),
    Column("webhook_url", Text),
    Column("idempotency_key", String(255)),
    Column("request_hash", String(64)),
    Column("started_at", Float),
    Column("completed_at", Float),
    Column("expires_at", Float),
    # events written so far = the seq of the next event; every fenced write also checks it
    Column("version", Integer, nullable=False, server_default="0"),
    Column("lease_holder", String(128)),
    Column("lease_epoch", Integer, nullable=False, server_default="0"),
    Column("lease_expires_at", Float),
    Column("takeovers", Integer, nullable=False, server_default="0"),  # claims after a holder was lost
    Column("adopted", Boolean, nullable=False, server_default=false()),  # the current lease was such a claim
    Column("checkpoint_step", Integer),  # steps done in the latents at checkpoint_key
    Column("checkpoint_key", String(512)),
    Column("cancel_requested", Boolean, nullable=False, server_default=false()),
    Column("delete_requested", Boolean, nullable=False, server_default=false()),
    Column("abandon_at", Float),  # a streaming client's job is cancelled when no stream renews this
    # the id of the last fenced write (holder, epoch, version): a retry whose commit was not acknowledged
    # finds its own id here; a takeover's writes never carry it
    Column("last_write", String(200)),
)
Index("ix_jobs_owner_created", jobs.c.owner, jobs.c.created_at, jobs.c.id)
Index("ix_jobs_created", jobs.c.created_at, jobs.c.id)
Index("ix_jobs_status_created", jobs.c.status, jobs.c.created_at)
Index("ix_jobs_expires_at", jobs.c.expires_at)
Index("ux_jobs_owner_idempotency_key", jobs.c.owner, jobs.c.idempotency_key, unique=True)

job_events = Table(
    "job_events",
    metadata,
    Column("job_id", String(64), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("type", String(32), nullable=False),
    Column("data", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", String(64), primary_key=True),  # the `webhook-id` header: the same on every retry
    Column("job_id", String(64), nullable=False),
    Column("event_type", String(32), nullable=False),
    Column("url", Text, nullable=False),
    Column("payload", Text, nullable=False),  # the exact body that is signed and sent
    Column("state", String(16), nullable=False),  # pending | delivered | failed
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("created_at", Float, nullable=False),
    Column("next_attempt_at", Float, nullable=False),
    Column("locked_until", Float),
    Column("delivered_at", Float),
    Column("last_error", Text),
)
Index("ix_webhook_deliveries_due", webhook_deliveries.c.state, webhook_deliveries.c.next_attempt_at)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),  # the owner of its jobs
    Column("name", String(128), nullable=False),
    Column("role", String(16), nullable=False),  # user | admin
    Column("secret_hash", String(64), nullable=False, unique=True),  # sha256 hex of the key
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
    # quotas of this key; NULL: the deployment's default
    Column("max_concurrent_jobs", Integer),
    Column("jobs_per_minute", Integer),
    Column("gpu_seconds_per_day", Float),
)

usage = Table(
    "usage",
    metadata,
    Column("job_id", String(64), primary_key=True),
    Column("owner", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("gpu_seconds", Float, nullable=False),
)
Index("ix_usage_owner_created", usage.c.owner, usage.c.created_at)

files = Table(
    "files",
    metadata,
    Column("id", String(64), primary_key=True),  # file-<created ms><random>
    Column("owner", String(128), nullable=False),
    Column("purpose", String(32), nullable=False),  # batch | batch_output
    Column("filename", String(255), nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("key", String(512), nullable=False),
    Column("expires_at", Float),  # when the sweep deletes it (NULL: kept; files made before revision 0007)
)
Index("ix_files_owner_created", files.c.owner, files.c.created_at, files.c.id)
Index("ix_files_expires_at", files.c.expires_at)

batches = Table(
    "batches",
    metadata,
    Column("id", String(64), primary_key=True),  # batch_<created ms><random>
    Column("owner", String(128), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(64), nullable=False),
    Column("completion_window", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("metadata", JSON),
    Column("cost_gpu_s", Float, nullable=False),  # the estimate of its valid requests, charged at creation
    Column("total", Integer, nullable=False),
    Column("completed", Integer, nullable=False, server_default="0"),
    Column("failed", Integer, nullable=False, server_default="0"),
    Column("output_file_id", String(64)),
    Column("error_file_id", String(64)),
    Column("errors", JSON),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),  # the end of the completion window
    Column("in_progress_at", Float),
    Column("finalizing_at", Float),
    Column("completed_at", Float),
    Column("failed_at", Float),
    Column("expired_at", Float),
    Column("cancelling_at", Float),
    Column("cancelled_at", Float),
    Column("lease_holder", String(128)),
    Column("lease_epoch", Integer, nullable=False, server_default="0"),
    Column("lease_expires_at", Float),
    # set when it ends: then the sweep deletes it, its stored input and outputs (its videos are jobs of their own)
    Column("retention_ends_at", Float),
)
Index("ix_batches_owner_created", batches.c.owner, batches.c.created_at, batches.c.id)
Index("ix_batches_status_created", batches.c.status, batches.c.created_at)
Index("ix_batches_retention_ends_at", batches.c.retention_ends_at)

batch_videos = Table(
    "batch_videos",
    metadata,
    Column("batch_id", String(64), ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True),
    Column("custom_id", String(128), primary_key=True),
    Column("video_id", String(64), nullable=False),
)
