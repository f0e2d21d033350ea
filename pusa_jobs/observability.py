"""What operators see: Prometheus metrics through Ray's metrics API, and a job's id on every log line.

Metrics are exported by each node's Ray metrics agent with Ray's ``ray_`` prefix (a counter ``pusa_x``
reads ``ray_pusa_x_total``). Each process creates its metrics once, on first use (`metrics()`).

Logs: a replica that serves a job binds the job's id for the work (`job_logging`); a filter on Serve's
logger puts it on every line written meanwhile, in every deployment (the TextEncoder, VAE and DiT get
it as an argument of the call, and Serve's own lines about those calls carry it as their request id),
so one ``grep`` of the cluster's Serve logs follows a job. Each event
of a job's life (accepted, claimed, step, retry, released, finished) is also one log line of its own
(`log_job_event`); with the configs' ``logging_config: {encoding: JSON}`` every line is a JSON object
whose fields include ``video_id`` (the job's id; Ray's own ``job_id`` names the Ray job), ``job_event``,
the deployment, the replica and the event's timings.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

from ray.serve import context as serve_context
from ray.util.metrics import Counter, Gauge, Histogram

logger = logging.getLogger("ray.serve")
_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("pusa_job_id", default=None)

# Seconds: a tiny-preset step on a CPU takes milliseconds, a 720p step with guidance on an A6000 minutes.
SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000]
BYTES = [2.0**30 * gib for gib in (1, 2, 4, 8, 16, 24, 32, 40, 44, 48, 64, 80, 96, 141)]


class _JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        job_id = _job_id.get()
        if job_id is not None and not hasattr(record, "video_id"):
            record.video_id = job_id  # (Ray's own records use `job_id` for the Ray job)
        return True


@cache
def install_job_logging() -> None:
    """Put the bound job id on the records of Serve's logger in this process (once)."""
    logger.addFilter(_JobIdFilter())


@contextmanager
def job_logging(job_id: str | None) -> Iterator[None]:
    """Bind `job_id` to the log lines written inside the block (and in threads it starts with
    `asyncio.to_thread`, which copies the context)."""
    install_job_logging()
    token = _job_id.set(job_id)
    try:
        yield
    finally:
        _job_id.reset(token)


def bind_job(job_id: str) -> None:
    """Bind `job_id` for the rest of the current task (a job's own asyncio task), also as the Serve
    request id of the handle calls it makes: Serve's own lines about those calls in the stage
    deployments (``CALL step OK 5.4ms``) then carry the job's id as their ``request_id``. (Serve has no
    public setter for it; `_set_request_context` is the one its proxy uses, in ray 2.60.)"""
    install_job_logging()
    _job_id.set(job_id)
    serve_context._set_request_context(request_id=job_id)


def log_job_event(event: str, job_id: str, **fields: Any) -> None:
    """One log line for an event of a job's life, its fields as attributes of the record."""
    install_job_logging()
    logger.info("job %s %s", job_id, event, extra={"video_id": job_id, "job_event": event, **fields})


@contextmanager
def timed(histogram: Histogram, **tags: str) -> Iterator[None]:
    """Observe the block's duration in seconds on `histogram` (when it does not raise)."""
    start = time.perf_counter()
    yield
    histogram.observe(time.perf_counter() - start, tags=tags)


@cache
def gpu_kind() -> str:
    """This process's accelerator, as a metric label: the CUDA device's name, else ``cpu``."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


class Metrics:
    """Every metric of the service. Labels: `task`, `preset`, `deployment`, `stage`, `gpu` where they apply."""

    def __init__(self) -> None:
        job = ("task", "preset")
        self.jobs_accepted = Counter("pusa_jobs_accepted", "Jobs accepted by the API.", tag_keys=job)
        self.jobs_finished = Counter("pusa_jobs_finished", "Jobs that ended, by status and reason "
                                     "(the error code of a failed job, the cause of a cancel).",
                                     tag_keys=(*job, "status", "reason"))
        self.requests_rejected = Counter("pusa_requests_rejected", "Requests answered with an error, by code.",
                                         tag_keys=("code", "type"))
        self.queue_depth = Gauge("pusa_queue_depth", "Jobs waiting for a runner (each runner reports the "
                                 "whole queue: take the max).")
        self.jobs_running = Gauge("pusa_jobs_running", "Jobs a runner replica runs now.", tag_keys=("replica",))
        self.queue_wait = Histogram("pusa_queue_wait_seconds", "From a job's creation to its first claim.",
                                    boundaries=SECONDS, tag_keys=job)
        self.step = Histogram("pusa_step_seconds", "A denoising step as the runner waits for it (DiT call, "
                              "latents both ways).", boundaries=SECONDS, tag_keys=job)
        self.stage = Histogram("pusa_stage_seconds", "Work of one stage call inside its deployment: "
                               "text_encode, conditioning_encode, dit_step, decode, write.",
                               boundaries=SECONDS, tag_keys=("stage", "deployment", "preset", "gpu"))
        self.stage_retries = Counter("pusa_stage_retries", "Stage calls retried, by stage and cause.",
                                     tag_keys=("stage", "cause"))
        self.lora_fuse = Histogram("pusa_lora_fuse_seconds", "LoRA re-fuses for a new combination (from the base "
                                   "weights) on a DiT replica.", boundaries=SECONDS, tag_keys=("preset", "gpu"))
        self.first_step = Histogram("pusa_dit_first_step_seconds", "A DiT replica's first step: its warm-up "
                                    "(compile included when configured).", boundaries=SECONDS,
                                    tag_keys=("preset", "gpu", "compiled"))
        self.memory_peak = Histogram("pusa_dit_memory_peak_bytes", "Peak GPU memory of a job's step on its DiT "
                                     "replica (one per job, at its last step).", boundaries=BYTES,
                                     tag_keys=("preset", "gpu"))
        self.takeovers = Counter("pusa_lease_takeovers", "Jobs claimed from a runner that stopped renewing.")
        self.releases = Counter("pusa_jobs_released", "Jobs a draining runner handed back.")
        self.checkpoint = Histogram("pusa_checkpoint_seconds", "Writing a step's latents to the blob store.",
                                    boundaries=SECONDS, tag_keys=("store",))
        self.batch_rows = Counter("pusa_batch_rows", "Rows of a `pusa batch` run that ended, by the run's output "
                                  "prefix and status (completed, failed).", tag_keys=("batch", "status"))


@cache
def metrics() -> Metrics:
    """This process's metrics (created on first use: Ray must be initialised)."""
    return Metrics()
