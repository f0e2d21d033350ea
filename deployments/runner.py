"""Runner deployment: the replicas that own and run jobs (the HTTP routers only queue them).

Each replica claims queued, released or orphaned jobs from the database while it has room
(``max_running_jobs``), renews the leases of the jobs it runs (only those: a job whose run gave up lapses
and is adopted), sends due webhooks and deletes expired jobs, batches and files.
A replica that dies stops renewing, and another one adopts its jobs from their checkpoints once the leases
expire. When Serve stops a replica (redeploy, downscale) its ``__del__`` drains: it stops claiming, lets
each job finish the step in flight (up to ``drain_wait_s``), checkpoints it and releases it, so another
replica resumes it at once. A runner has no HTTP traffic, so Serve calls ``__del__`` as soon as it stops one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid

import httpx
import ray
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pusa_jobs.batches import BatchLease, BatchStore
from pusa_jobs.db import open_database
from pusa_jobs.job_files import JobFiles
from pusa_jobs.job_store import JobStore
from pusa_jobs.observability import metrics
from pusa_jobs.retention import sweep_expired
from pusa_jobs.storage import open_store
from pusa_jobs.webhooks import WebhookSender, WebhookSettings

from .batch_run import BatchDriver
from .job_run import JobRun, RunContext
from .stages import StageSettings, Stages

logger = logging.getLogger("ray.serve")


class RunnerSettings(BaseModel):
    """App arg ``runner``: limits and timings of every runner replica."""

    model_config = ConfigDict(extra="forbid")

    max_running_jobs: int = 4  # jobs one replica runs at a time
    poll_s: float = 0.5  # how often an idle replica looks for jobs, batches every 4 * poll_s (a new one wakes it)
    lease_ttl_s: float = 30.0  # a job whose holder has not renewed for this long is adopted
    renew_s: float = 5.0
    max_takeovers: int = 3  # a job adopted more often than this (its holders keep dying) fails runner_lost
    checkpoint_every: int = 1  # steps between checkpoints of the latents
    window_retries: int = 1  # a long video's window whose stages gave up runs again from its start
    drain_wait_s: float = 30.0  # on shutdown, how long a job may finish its step before it is released
    outage_s: float = 600.0  # how long a job waits out an unreachable database or store
    sweep_s: float = 60.0  # how often expired jobs, batches and files are deleted
    run_batches: bool = True  # replicas claim batches (one at a time on the whole cluster; see batch_run.py)
    stages: StageSettings = StageSettings()


@serve.deployment(name="Runner")
class Runner:
    """Claims jobs from the database and runs them through the TextEncoder, VAE and DiT deployments (a
    two-expert model's steps through `dit_high` and `dit_low`); `models`: the models served, name -> preset;
    `wan22_loras`: the LoRA registry of a pusa-wan2.2 batch (`batch`'s ``loras`` are pusa-v1's)."""

    async def __init__(
        self, text_encoder: DeploymentHandle, vae: DeploymentHandle, dit: DeploymentHandle,
        preset: str = "tiny", store: str = "data", database: str = "sqlite:///data/jobs.db",
        settings: dict | None = None, webhooks: dict | None = None, retention_s: float = 7 * 86400,
        batch: dict | None = None, models: dict[str, str] | None = None,
        dit_high: DeploymentHandle | None = None, dit_low: DeploymentHandle | None = None,
        wan22_loras: dict | None = None,
    ) -> None:
        self.settings = s = RunnerSettings.model_validate(settings or {})
        self.holder = f"runner-{uuid.uuid4().hex[:12]}"
        self.retention_s = retention_s
        db = await asyncio.to_thread(open_database, database)
        self.jobs = JobStore(db, lease_ttl_s=s.lease_ttl_s)
        files = JobFiles(await asyncio.to_thread(open_store, store))
        hooks = WebhookSettings.model_validate(webhooks or {})
        secret = hooks.secret()
        self.webhooks = WebhookSender(db, hooks, secret) if secret else None
        self.draining = asyncio.Event()
        self.ctx = RunContext(
            jobs=self.jobs, files=files, settings=s, preset=preset, models=models,
            stages=Stages(text_encoder, vae, dit, s.stages,
                          experts=tuple(h for h in (dit_high, dit_low) if h is not None)),
            retention_s=retention_s, webhook_url=hooks.url if secret else None, draining=self.draining,
        )
        self.runs: dict[str, tuple[JobRun, asyncio.Task]] = {}
        self.batches = BatchStore(db, lease_ttl_s=s.lease_ttl_s)
        self.batch_driver_args = dict(
            database=database, store=store, settings={"preset": preset, **(batch or {})}, preset=preset,
            retention_s=retention_s, renew_s=s.renew_s, lease_ttl_s=s.lease_ttl_s, outage_s=s.outage_s,
            models=models, wan22_loras=wan22_loras)
        self.batch_driver: ray.actor.ActorHandle | None = None
        self.batch_task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._batch_wake = asyncio.Event()
        loops = [self._dispatch, self._renew, self._sweep] + ([self._send_webhooks] if self.webhooks else []) + \
            ([self._run_batches] if s.run_batches else [])
        self._loops = [asyncio.create_task(loop(), name=loop.__name__) for loop in loops]

    # -- API for the routers and operators ---------------------------------------------------------

    async def wake(self, batch: bool = False) -> None:
        """A job (or, with `batch`, a batch) was queued: look for it now rather than at the next poll."""
        (self._batch_wake if batch else self._wake).set()

    async def stats(self) -> dict:
        """This replica's lease holder name, pid and the jobs it runs (for operators and tests)."""
        return {"holder": self.holder, "pid": os.getpid(), "running": sorted(self.runs),
                "draining": self.draining.is_set(), "batch": self.batch_task.get_name() if self.batch_task else None}

    async def check_health(self) -> None:
        """Unhealthy once one of the replica's loops has stopped (unless it is draining): Serve then
        replaces the replica, and its jobs are adopted from their checkpoints."""
        if self.draining.is_set():
            return
        for task in self._loops:
            if task.done():
                why = "cancelled" if task.cancelled() else repr(task.exception())
                raise RuntimeError(f"runner loop {task.get_name()} stopped ({why})")

    async def __del__(self) -> None:
        """Drain (Serve calls this when it stops the replica): stop claiming, let every job finish its
        step for up to ``drain_wait_s``, release them, stop the loops."""
        self.draining.set()
        self._wake.set()
        self._batch_wake.set()
        if self.batch_driver is not None:
            try:
                await self.batch_driver.drain.remote()
            except Exception as exc:  # the driver is gone already
                logger.warning("could not drain the batch driver: %r", exc)
        tasks = [task for _, task in self.runs.values()] + ([self.batch_task] if self.batch_task else [])
        logger.info("runner %s draining %d jobs", self.holder, len(tasks))
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.settings.drain_wait_s)
            for task in late:  # still in a long call: cancelled, released at their last checkpoint
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=30)
        for task in self._loops:
            task.cancel()

    # -- loops -----------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        """Claim jobs while there is room, oldest first."""
        while not self.draining.is_set():
            lease = None
            if len(self.runs) < self.settings.max_running_jobs:
                try:
                    lease = await asyncio.to_thread(self.jobs.claim, self.holder, set(self.runs))
                except Exception as exc:  # the database away: try again at the next poll
                    logger.warning("claiming a job failed: %r", exc)
            if lease is not None:
                run = JobRun(self.ctx, lease)
                self.runs[lease.job_id] = (run, asyncio.create_task(self._run(run)))
                self._report_running()
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_s)
            except asyncio.TimeoutError:
                pass

    async def _run(self, run: JobRun) -> None:
        try:
            await run.run()
        finally:
            self.runs.pop(run.job_id, None)
            self._report_running()
            self._wake.set()

    def _report_running(self) -> None:
        metrics().jobs_running.set(len(self.runs), tags={"replica": self.holder})

    async def _renew(self) -> None:
        """Renew the leases of the jobs this replica runs; stop the runs whose lease another replica took
        over. Also report the queue's depth."""
        while True:
            await asyncio.sleep(self.settings.renew_s)
            await self._renew_round()

    async def _renew_round(self) -> None:
        runs = list(self.runs.items())  # jobs claimed while renewing are not judged by this round
        # Only leases of runs still going: a run that returned (it gave up on an outage, or could not
        # write the job's end) leaves its job to lapse and be adopted, here or by another replica.
        running = {job_id: run.lease.epoch for job_id, (run, task) in runs if not task.done() and not run.let_go}
        try:
            held = await asyncio.to_thread(self.jobs.renew, self.holder, running)
            metrics().queue_depth.set(await asyncio.to_thread(self.jobs.queued_count))
        except Exception as exc:
            logger.warning("renewing leases failed: %r", exc)
            return
        for job_id, (run, task) in runs:
            if held.get(job_id) != run.lease.epoch and not run.let_go and not task.done():
                logger.warning("job %s: lease lost to another runner; stopping it here", job_id)
                task.cancel()

    async def _sweep(self) -> None:
        """Delete jobs, batches and files past their retention (`retention.sweep_expired`: files first, then
        the rows) and quota charges past every quota's window."""
        while True:
            try:
                await asyncio.to_thread(sweep_expired, self.jobs, self.batches, self.ctx.files)
                await asyncio.to_thread(self.jobs.prune_usage)
                if self.webhooks is not None:
                    await asyncio.to_thread(self.webhooks.forget_settled, self.retention_s)
            except Exception:
                logger.exception("deleting expired jobs failed")
            await asyncio.sleep(self.settings.sweep_s)

    async def _run_batches(self) -> None:
        """Claim a batch when no runner of the cluster drives one, and drive it to its end in a
        `BatchDriver` actor on this node."""
        while not self.draining.is_set():
            self._batch_wake.clear()  # a wake-up from now on makes the next claim come at once
            try:
                lease = await asyncio.to_thread(self.batches.claim, self.holder)
            except Exception as exc:
                logger.warning("claiming a batch failed: %r", exc)
                lease = None
            if lease is None:
                try:
                    await asyncio.wait_for(self._batch_wake.wait(), self.settings.poll_s * 4)
                except asyncio.TimeoutError:
                    pass
                continue
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
            self.batch_driver = BatchDriver.options(scheduling_strategy=here).remote(**self.batch_driver_args)
            self.batch_task = asyncio.create_task(self._drive(lease), name=lease.batch.id)
            try:
                await self.batch_task
            finally:
                ray.kill(self.batch_driver)
                self.batch_driver, self.batch_task = None, None

    async def _drive(self, lease: BatchLease) -> None:
        try:
            await self.batch_driver.run.remote(lease)
        except Exception:  # the driver died: its lease lapses and a runner resumes the batch
            logger.exception("the driver of batch %s failed", lease.batch.id)

    async def _send_webhooks(self) -> None:
        async with httpx.AsyncClient() as client:
            while True:
                try:
                    await self.webhooks.send_due(client)
                except Exception:
                    logger.exception("sending webhooks failed")
                await asyncio.sleep(self.settings.poll_s)
