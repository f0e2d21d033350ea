"""Job execution inside a router replica: queue, VTA step loop over the DiT deployment, recovery.

Per job: text encoding and conditioning encoding start together; their `DeploymentResponse`s go
straight into the DiT's first step (and the text embeddings into every step), so embeddings and
conditioning latents never pass through the router. Each step's latents do come back: they are the
checkpoint from which a step is retried when its DiT replica dies, and the point where cancellation
and progress land. Job records live in the shared store; a job whose router stops heartbeating is
adopted by another router replica (or failed after `max_attempts`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle

from pusa_model.errors import InvalidRequest
from pusa_model.request import GenerationRequest
from pusa_model.schedule import frame_timesteps

from .dit import alpha_model_id
from .jobs import Job, JobStore
from .vae import plan_from_job

logger = logging.getLogger("ray.serve")

REPLICA_LOST = (RayActorError, ActorUnavailableError)


@dataclass(frozen=True)
class RunnerSettings:
    """Limits and timings of a router replica's job runner."""

    max_running_jobs: int = 4
    max_queued_jobs: int = 32
    step_retries: int = 3
    heartbeat_s: float = 5.0
    stale_after_s: float = 60.0
    max_attempts: int = 3
    retry_after_s: int = 30


class JobRunner:
    """Runs the jobs this router replica owns, `max_running_jobs` at a time."""

    def __init__(
        self, jobs: JobStore, text: DeploymentHandle, vae: DeploymentHandle, dit: DeploymentHandle,
        preset: str, owner: str, settings: RunnerSettings,
    ) -> None:
        self.jobs, self.text, self.vae, self.dit = jobs, text, vae, dit
        self.preset, self.owner, self.settings = preset, owner, settings
        self._queue: list[str] = []
        self._owned: dict[str, Job] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._running: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    # -- public --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the dispatch and heartbeat/recovery loops (idempotent; needs a running loop)."""
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._dispatch()), asyncio.create_task(self._maintain())]

    def has_room(self) -> bool:
        s = self.settings
        return len(self._queue) + len(self._running) < s.max_queued_jobs + s.max_running_jobs

    def queue_position(self, job_id: str) -> int | None:
        """1-based place of a queued job in this replica's queue (None if not queued here)."""
        return self._queue.index(job_id) + 1 if job_id in self._queue else None

    async def submit(self, job: Job) -> Job:
        """Store a new job and queue it here."""
        job.owner, job.heartbeat_at = self.owner, time.time()
        self._owned[job.id] = job
        self._queue.append(job.id)
        self.jobs.add_event(job, {"type": "queued", "position": len(self._queue)})
        await asyncio.to_thread(self.jobs.create, job)
        self._wake.set()
        return job

    async def cancel(self, job_id: str) -> None:
        """Ask for a job to stop; whichever replica runs it stops before its next step."""
        await asyncio.to_thread(self.jobs.request_cancel, job_id)
        if job_id in self._queue:  # never started here: finish it now
            self._queue.remove(job_id)
            await self._finish(self._owned[job_id], "cancelled", {"type": "cancelled"})

    # -- loops ---------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue and len(self._running) < self.settings.max_running_jobs:
                job_id = self._queue.pop(0)
                self._running.add(job_id)
                asyncio.create_task(self._run(self._owned[job_id]))

    async def _maintain(self) -> None:
        """Heartbeat owned jobs; adopt jobs whose router stopped heartbeating."""
        while True:
            try:
                now = time.time()
                for job in list(self._owned.values()):
                    await self._heartbeat(job, now)
                await self._adopt_stale(now)
            except Exception:  # a store hiccup must not stop the loop
                logger.exception("job maintenance failed")
            await asyncio.sleep(self.settings.heartbeat_s)

    async def _adopt_stale(self, now: float) -> None:
        stale = await asyncio.to_thread(self.jobs.stale_jobs, now, self.settings.stale_after_s)
        for job in stale:
            if job.id in self._owned or not self.has_room():
                continue
            job = await asyncio.to_thread(self.jobs.claim, job, self.owner, now)
            self._owned[job.id] = job
            if job.attempts > self.settings.max_attempts:
                error = {"code": "router_lost", "message": f"the job's router stopped {job.attempts - 1} times"}
                await self._finish(job, "failed", {"type": "failed", "error": error}, error=error)
                continue
            logger.info("adopting job %s (attempt %d)", job.id, job.attempts)
            job.status, job.progress = "queued", 0
            self._queue.append(job.id)
            self.jobs.add_event(job, {"type": "queued", "position": len(self._queue), "requeued": True})
            await self._save(job)
            self._wake.set()

    # -- one job -------------------------------------------------------------------------------

    async def _heartbeat(self, job: Job, now: float) -> None:
        """Record that this replica still owns `job`, unless it finished meanwhile (a finished job's
        record may already be deleted and must not be written back)."""
        lock = self._locks.setdefault(job.id, asyncio.Lock()) if job.id in self._owned else None
        if lock is None:
            return
        async with lock:
            if job.id in self._owned and not job.terminal:
                job.heartbeat_at = now
                await asyncio.to_thread(self.jobs.save, job)

    async def _save(self, job: Job) -> None:
        async with self._locks.setdefault(job.id, asyncio.Lock()):
            await asyncio.to_thread(self.jobs.save, job)

    async def _event(self, job: Job, event: dict, **changes) -> None:
        for key, value in changes.items():
            setattr(job, key, value)
        self.jobs.add_event(job, event)
        await self._save(job)

    async def _finish(self, job: Job, status: str, event: dict, error: dict | None = None) -> None:
        job.completed_at = time.time()
        await self._event(job, event, status=status, error=error, progress=100 if status == "completed" else job.progress)
        self._owned.pop(job.id, None)
        self._locks.pop(job.id, None)

    async def _cancelled(self, job: Job) -> bool:
        return await asyncio.to_thread(self.jobs.cancel_requested, job.id)

    async def _run(self, job: Job) -> None:
        try:
            await self._execute(job)
        except InvalidRequest as exc:
            error = {"code": "invalid_request", "message": str(exc), "param": exc.field}
            await self._finish(job, "failed", {"type": "failed", "error": error}, error=error)
        except Exception as exc:  # report every failure on the job, never leave it in_progress
            logger.exception("job %s failed", job.id)
            error = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
            await self._finish(job, "failed", {"type": "failed", "error": error}, error=error)
        finally:
            self._running.discard(job.id)
            self._wake.set()

    async def _execute(self, job: Job) -> None:
        if await self._cancelled(job):
            await self._finish(job, "cancelled", {"type": "cancelled"})
            return
        req = GenerationRequest.model_validate(job.request)
        plan = plan_from_job(job.request, job.plan["seed"], self.preset)
        started = time.time()
        await self._event(job, {"type": "encoding"}, status="in_progress", started_at=started, progress=1)

        negative = req.negative_prompt if req.guidance != 1.0 else None
        text = self.text.encode.remote(req.prompt, negative)
        clean = self.vae.encode_conditioning.remote(job.request, plan.seed, job.inputs)
        sigmas, multipliers = plan.sigmas, plan.multipliers
        dit = self.dit.options(multiplexed_model_id=alpha_model_id(req.lora_alpha))

        latents = None
        loop_start = time.time()
        for k in range(req.steps):
            if await self._cancelled(job):
                await self._finish(job, "cancelled", {"type": "cancelled", "step": k})
                return
            latents = await self._step(job, dit, latents, clean if k == 0 else None, plan.seed, k, sigmas,
                                       multipliers, text, req.guidance)
            elapsed = time.time() - loop_start
            eta = elapsed / (k + 1) * (req.steps - k - 1)
            event = {
                "type": "step", "step": k + 1, "total": req.steps,
                "timesteps": [round(t, 3) for t in frame_timesteps(sigmas, multipliers, k).tolist()],
                "elapsed_s": round(elapsed, 3), "eta_s": round(eta, 3),
            }
            await self._event(job, event, progress=2 + int(93 * (k + 1) / req.steps))

        await self._event(job, {"type": "decoding"}, progress=96)
        await self.vae.decode_to_store.remote(job.id, latents, req.fps)
        url = self.jobs.store.url(self.jobs.result_key(job.id, "video"))
        await self._finish(job, "completed", {"type": "completed", "url": url or f"/v1/videos/{job.id}/content"})

    async def _step(self, job: Job, dit: DeploymentHandle, latents, clean, seed: int, k: int,
                    sigmas, multipliers, text, guidance: float):
        """One DiT step, retried on another replica when the one running it dies."""
        retries = 0
        while True:
            try:
                return await dit.step.remote(latents, clean, seed, k, sigmas.tolist(), multipliers.tolist(),
                                             text, guidance)
            except REPLICA_LOST as exc:
                retries += 1
                if retries > self.settings.step_retries:
                    raise
                logger.warning("job %s step %d: DiT replica lost (%s); retrying", job.id, k, type(exc).__name__)
                await self._event(job, {"type": "retry", "step": k + 1, "reason": type(exc).__name__})


def new_job_plan(plan) -> dict:
    """The plan fields a job record keeps (sizes, seed, steps) for listing and rebuilding."""
    return {"width": plan.width, "height": plan.height, "frames": plan.frames, "fps": plan.request.fps,
            "seed": plan.seed, "steps": plan.request.steps, "task": plan.request.task,
            "latent_frames": plan.latent_frames}

