"""One claimed job, run from its last checkpoint (or the start) until it ends, is released or its lease is lost.

The runner's executor of a job's plan of operations (`pusa_model.operations`), each through a stage
deployment: text encoding; the first window's conditioning (none for t2v); one DiT call per denoising step,
each followed by a checkpoint of the latents in the blob store (every ``checkpoint_every`` steps, and a
window's last step always) and one fenced write of the step's event, progress and checkpoint pointer, made
while the DiT already computes the window's next step from the same latents (so the store and the database
stay off the DiT's path; when that write ends the job, the step started ahead is dropped); a long
video's windows decoded to the store (each announced by a `segment` event) and the next window's conditioning
encoded from the stored frames; the video decoded or stitched to the store; the final write. Every fenced
write returns the flags other replicas raised, so a cancel lands at the next step's write. A draining
runner releases the job after its current step; the next holder continues at the operation after the
checkpoint's step, and since the latents are saved exactly, its video is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pusa_jobs.db import is_transient
from pusa_jobs.job_files import JobFiles
from pusa_jobs.job_store import JobStore, Lease, LeaseLost, Signals
from pusa_jobs.observability import bind_job, log_job_event, metrics, timed
from pusa_jobs.storage import StoreUnavailable
from pusa_jobs.submission import MODEL_NAME
from pusa_jobs.webhooks import delivery
from pusa_model.errors import InvalidRequest
from pusa_model.operations import (DecodeWindow, DenoiseStep, EncodeConditioning, EncodeExtension, EncodeText,
                                   Operation, Operations, StepInput, Stitch)
from pusa_model.request import GenerationPlan, replan
from pusa_model.schedule import frame_timesteps

from .stages import StageFailed, Stages

if TYPE_CHECKING:
    from .runner import RunnerSettings

logger = logging.getLogger("ray.serve")

T = TypeVar("T")


@dataclass
class RunContext:
    """What every job run of one runner replica shares."""

    jobs: JobStore
    files: JobFiles
    stages: Stages
    settings: RunnerSettings  # checkpoint_every, max_takeovers, outage_s, ...
    preset: str  # pusa-v1's
    retention_s: float
    webhook_url: str | None  # the deployment's receiver, if any (a request's own URL wins)
    draining: asyncio.Event
    models: dict[str, str] | None = None  # the models served, name -> preset; None: pusa-v1 on `preset`

    def preset_of(self, model: str) -> str:
        """The preset of a job's `model`; `StageFailed` when this deployment does not serve it (a job
        queued before the app was redeployed without it)."""
        preset = (self.models or {MODEL_NAME: self.preset}).get(model)
        if preset is None:
            raise StageFailed("model_not_served", f"model {model!r} is not served by this deployment any more")
        return preset


# The operations of a long video's window that run again from its start when its stages give up.
WINDOW_OPERATIONS = (EncodeConditioning, EncodeExtension, DenoiseStep)


@dataclass
class _Carried:
    """What one run's operations hand on: the text's object-store reference, the window's conditioning, the
    latents of the last step, when (and from which step) this run began the window's steps, and the windows
    a runner before this one announced."""

    text: Any = None
    clean: Any = None
    latents: Any = None
    loop: tuple[float, int] | None = None
    announced: set[int] = field(default_factory=set)
    ahead: _StepCall | None = None  # the window's next step, started before this step's writes

    def drop_ahead(self) -> None:
        """Withdraw the step started ahead, if any (the job stopped, or a window runs again)."""
        if self.ahead is not None:
            task, self.ahead = self.ahead.task, None
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: the job ends for its own reason
            task.cancel()


@dataclass
class _StepCall:
    """One DiT step in flight: `task` gives its latents and the seconds the call took. A step started ahead
    records its retries only once the step before it is recorded (`recorded`), so events keep their order."""

    task: asyncio.Task
    recorded: asyncio.Event


def _unavailable(exc: BaseException) -> bool:
    return is_transient(exc) or isinstance(exc, StoreUnavailable)


def progress_after(step: int, steps: int) -> int:
    """The job's progress (0-100) once `step` of `steps` denoising steps are done."""
    return 2 + int(93 * step / steps)


class JobRun:
    """Runs the job of `lease` for the runner whose context is `ctx`."""

    def __init__(self, ctx: RunContext, lease: Lease) -> None:
        self.ctx = ctx
        self.lease = lease
        self.let_go = False  # the job has ended or was released: its lease is gone on purpose
        self._write: asyncio.Future | None = None
        self._one_write = asyncio.Lock()
        self._checkpoint_key = lease.job.checkpoint_key  # the latest, which the job row points at

    @property
    def job_id(self) -> str:
        return self.lease.job_id

    async def run(self) -> None:
        """Run to an end; never raises (what cannot be written stays claimable once the lease expires)."""
        bind_job(self.job_id)
        try:
            await self._run()
        except LeaseLost as exc:
            logger.warning("job %s: %s; stopping", self.job_id, exc)
            await self._forget_if_gone()
        except asyncio.CancelledError:
            if self.ctx.draining.is_set() and not self.let_go:
                await asyncio.shield(self._release_after_cancel())
            raise
        except Exception as exc:
            if self.let_go:  # the job ended or was released already: nothing more is written
                logger.exception("job %s: error after its lease was let go", self.job_id)
                return
            if _unavailable(exc):  # never fail a job for an outage: another runner adopts it later
                logger.error("job %s: store or database unavailable for %.0f s; leaving it to be adopted",
                             self.job_id, self.ctx.settings.outage_s)
                return
            await self._fail(exc)

    async def _forget_if_gone(self) -> None:
        """After losing the lease: if the job is gone or going (deleted, or its retention over), remove its
        files again. This run may have written one (a checkpoint, a window, the video) after whoever removed
        the job removed them, and no sweep would find it: the job's row is gone. While the row stays, its
        end or its sweep removes what this run wrote before."""
        try:
            job = await self._persist(self.ctx.jobs.peek, self.job_id)
            if job is None or (job.terminal and (job.delete_requested or (job.expires_at or 0) < time.time())):
                await self._persist(self.ctx.files.delete_all, self.job_id)
        except Exception:  # an outage longer than outage_s: what this run wrote stays
            logger.exception("job %s: could not check whether its files are orphaned", self.job_id)

    # -- persistence -----------------------------------------------------------------------------

    async def _persist(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in a thread, retried with backoff while the database or the store is
        unreachable (for up to ``outage_s``). One write at a time; a cancelled caller leaves it to finish."""
        delay, deadline = 0.2, time.monotonic() + self.ctx.settings.outage_s
        async with self._one_write:  # a step started ahead may record a retry while the step before writes
            while True:
                self._write = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
                try:
                    return await asyncio.shield(self._write)
                except Exception as exc:
                    if not _unavailable(exc) or time.monotonic() > deadline:
                        raise
                    logger.warning("job %s: %s unavailable (%s); retrying in %.1f s", self.job_id,
                                   "store" if isinstance(exc, StoreUnavailable) else "database",
                                   type(exc).__name__, delay)
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, 5.0)

    async def _record(self, event: dict | None = None, **changes: Any) -> Signals:
        return await self._persist(self.ctx.jobs.record, self.lease, event, **changes)

    async def _on_retry(self, stage: str, attempt: int, cause: str, reason: str, step: int | None = None) -> None:
        event = {"type": "retry", "stage": stage, "attempt": attempt, "reason": reason}
        if step is not None:
            event["step"] = step
        metrics().stage_retries.inc(tags={"stage": stage, "cause": cause})
        log_job_event("retry", self.job_id, stage=stage, attempt=attempt, cause=cause, reason=reason, step=step)
        await self._record(event)

    @property
    def _tags(self) -> dict[str, str]:
        job = self.lease.job
        preset = (self.ctx.models or {}).get(job.model, self.ctx.preset)
        return {"task": str(job.request.get("task")), "preset": preset}

    # -- the job ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        ctx, job = self.ctx, self.lease.job
        log_job_event("claimed", job.id, holder=self.lease.holder, epoch=self.lease.epoch, adopted=job.adopted,
                      resume_step=job.checkpoint_step or 0)
        if job.adopted:
            metrics().takeovers.inc()
        elif not self.lease.resumed:
            metrics().queue_wait.observe(max(0.0, time.time() - job.created_at), tags=self._tags)
        if job.cancel_requested:
            return await self._end("cancelled", {"type": "cancelled", "step": job.checkpoint_step or 0})
        if job.takeovers > ctx.settings.max_takeovers:
            error = {"code": "runner_lost",
                     "message": f"the runner replica running this job was lost {job.takeovers} times; given up"}
            return await self._end("failed", {"type": "failed", "error": error}, error=error)
        # planned once for this run, on the job's own model
        ops = replan(job.request, job.plan["seed"], ctx.preset_of(job.model)).operations
        done = job.checkpoint_step or 0
        if self.lease.resumed:
            await self._record({"type": "queued", "requeued": True, "resume_step": done})
        if await self._stop(await self._record({"type": "encoding"}, progress=max(job.progress, 1)), done):
            return
        if await self._execute(ops, ops.after_steps(done)):
            return
        await self._end("completed", {"type": "completed", "url": f"/v1/videos/{job.id}/content"}, progress=100)

    async def _execute(self, ops: Operations, n: int) -> bool:
        """Execute `ops` from operation `n` (after the checkpoint's step) to the end; True when the job stopped
        or was released on the way. The text embeddings are never saved, so a resumed run executes operation
        0 first; the latents it resumes from come from the checkpoint. A long video's window whose stages
        gave up runs again from its first operation, up to ``window_retries`` times, without redoing the
        windows before it."""
        ctx, plan = self.ctx, ops.plan
        carried = _Carried()
        if n > 0:
            await self._operation(ops, ops[0], carried)
        if self.lease.resumed and len(plan.windows) > 1:  # segments whose event a runner before this one recorded
            carried.announced = {e["segment"] for e in await self._persist(ctx.jobs.events_after, self.job_id, -1)
                                 if e["type"] == "segment"}
        retries: Counter[int] = Counter()
        try:
            while n < len(ops):
                op = ops[n]
                try:
                    if await self._operation(ops, op, carried):
                        return True
                except StageFailed as exc:
                    window = getattr(op, "window", 0)
                    if len(plan.windows) == 1 or not isinstance(op, WINDOW_OPERATIONS) \
                            or not exc.code.endswith("_unavailable") or retries[window] == ctx.settings.window_retries:
                        raise
                    retries[window] += 1
                    await self._on_retry("window", retries[window], "stage_failed", str(exc),
                                         step=window * plan.request.steps)
                    n, carried.clean, carried.latents, carried.loop = ops.window_start(window), None, None, None
                    continue
                n += 1
            return False
        finally:
            carried.drop_ahead()

    async def _operation(self, ops: Operations, op: Operation, carried: _Carried) -> bool:
        """Execute `op` through the stage deployments; True when the job stopped or was released after it."""
        ctx, job, plan = self.ctx, self.lease.job, ops.plan
        window = plan.windows[getattr(op, "window", 0)]
        if isinstance(op, DenoiseStep):
            return await self._step(ops, op, carried)
        carried.loop = None
        if isinstance(op, EncodeText):
            carried.text = await ctx.stages.encode_text(job.id, plan, self._on_retry)
        elif isinstance(op, EncodeConditioning):
            carried.clean = await ctx.stages.encode_conditioning(job.id, window, job.inputs, self._on_retry)
        elif isinstance(op, EncodeExtension):
            previous = ctx.files.window_frames_key(job.id, op.window - 1)
            carried.clean = await ctx.stages.encode_extension(job.id, window, previous, self._on_retry)
        elif isinstance(op, DecodeWindow):
            # A run resumed at a window's decode may find its frames stored: decoded before this runner took
            # the job over, and announced then, or not if that runner died first.
            if carried.latents is None and await self._persist(
                    ctx.files.store.exists, ctx.files.window_frames_key(job.id, op.window)):
                if op.window in carried.announced:
                    return False
            else:
                await ctx.stages.decode_window(job.id, op.window, window, await self._latents(carried),
                                               self._on_retry)
            return await self._stop(await self._segment(plan, op.window), (op.window + 1) * plan.request.steps)
        else:
            await self._record({"type": "decoding"}, progress=96)
            if isinstance(op, Stitch):
                await ctx.stages.stitch(job.id, plan, self._on_retry)
            else:
                await ctx.stages.decode(job.id, plan, await self._latents(carried), self._on_retry)
        return False

    async def _latents(self, carried: _Carried) -> Any:
        """The latents of the last step: this run's, or the checkpoint's where it resumed."""
        if carried.latents is None:
            carried.latents = await self._persist(self.ctx.files.get_checkpoint, self._checkpoint_key)
        return carried.latents

    async def _segment(self, plan: GenerationPlan, i: int) -> Signals:
        """Announce decoded window `i` of a long video (its `segment` event, with the URL of its MP4)."""
        url = f"/v1/videos/{self.job_id}/content?segment={i}"
        return await self._record({"type": "segment", "segment": i, "segments": len(plan.windows),
                                   "frames": plan.windows[i].frames, "url": url})

    async def _step(self, ops: Operations, op: DenoiseStep, carried: _Carried) -> bool:
        """Denoising step `op`, its checkpoint and its event; True when the job stopped or was released. Steps
        are counted over every window of a long video. The window's next step starts before this one's writes
        (not while draining: the job is released after this step)."""
        ctx, job, plan = self.ctx, self.lease.job, ops.plan
        window, total, done, k = plan.windows[op.window], ops.steps, op.done, op.step
        if carried.loop is None:  # the window's steps begin (or resume) in this run
            carried.loop = (time.monotonic(), k)
        loop_start, first = carried.loop
        call, carried.ahead = carried.ahead, None  # only ever this step: the next operation after the last one
        if call is None:
            latents = None if k == 0 else await self._latents(carried)
            call = self._start_step(window, op, latents, carried, ahead=False)
        latents, step_s = await call.task
        carried.latents = latents
        if k + 1 < window.request.steps and not ctx.draining.is_set():
            carried.ahead = self._start_step(window, DenoiseStep(op.window, k + 1, done + 1), latents, carried,
                                             ahead=True)
        metrics().step.observe(step_s, tags=self._tags)
        elapsed = time.monotonic() - loop_start
        event = {"type": "step", "step": done, "total": total,
                 "timesteps": [round(t, 3) for t in frame_timesteps(window.sigmas, window.multipliers, k).tolist()],
                 "elapsed_s": round(elapsed, 3), "eta_s": round(elapsed / (k + 1 - first) * (total - done), 3),
                 "step_s": round(step_s, 3)}
        if len(plan.windows) > 1:
            event["segment"] = op.window
        changes: dict[str, Any] = {"progress": progress_after(done, total)}
        if done % ctx.settings.checkpoint_every == 0 or k + 1 == window.request.steps:
            changes.update(checkpoint_step=done, checkpoint_key=await self._checkpoint(done, latents))
        signals = await self._record(event, **changes)
        if carried.ahead is not None:
            carried.ahead.recorded.set()
        log_job_event("step", job.id, step=done, total=total, seconds=round(step_s, 4),
                      elapsed_s=event["elapsed_s"], checkpoint="checkpoint_key" in changes)
        if "checkpoint_key" in changes:
            if self._checkpoint_key is not None:  # the pointer moved on: the old latents are garbage
                await self._persist(ctx.files.store.delete, self._checkpoint_key)
            self._checkpoint_key = changes["checkpoint_key"]
        if await self._stop(signals, done):
            return True
        if ctx.draining.is_set() and done < total and carried.ahead is None:
            await self._release(done, latents)
            return True
        return False

    def _start_step(self, window: GenerationPlan, op: DenoiseStep, latents: Any, carried: _Carried,
                    ahead: bool) -> _StepCall:
        """Call the DiT for step `op` from `latents` (None at a window's first step); `ahead`: started before
        the step before it is recorded, so its retries wait for that."""
        inp = StepInput.of(window, op.step, latents, carried.clean, carried.text)
        recorded = asyncio.Event()
        if not ahead:
            recorded.set()

        async def on_retry(stage: str, attempt: int, cause: str, reason: str) -> None:
            await recorded.wait()
            await self._on_retry(stage, attempt, cause, reason, step=op.done)

        async def step() -> tuple[Any, float]:
            started = time.monotonic()
            latents = await self.ctx.stages.step(self.job_id, window, inp, on_retry)
            return latents, time.monotonic() - started

        return _StepCall(asyncio.ensure_future(step()), recorded)

    async def _stop(self, signals: Signals, step: int) -> bool:
        """End the job as cancelled if a replica asked for it (or its streaming client left)."""
        if not (signals.cancel or signals.abandoned):
            return False
        event = {"type": "cancelled", "step": step}
        if signals.abandoned and not signals.cancel:
            event["reason"] = "client_disconnected"
        await self._end("cancelled", event)
        return True

    async def _release(self, done: int, latents) -> None:
        """Checkpoint (if the last step was not) and give the job back for another runner to resume."""
        ctx, job = self.ctx, self.lease.job
        changes: dict[str, Any] = {}
        if done % ctx.settings.checkpoint_every:
            changes = {"checkpoint_step": done, "checkpoint_key": await self._checkpoint(done, latents)}
        await self._persist(ctx.jobs.release, self.lease, {"type": "released", "step": done}, **changes)
        self.let_go = True
        metrics().releases.inc()
        log_job_event("released", job.id, step=done)

    async def _checkpoint(self, done: int, latents) -> str:
        """Write the latents after `done` steps to the blob store; returns their key."""
        files = self.ctx.files
        with timed(metrics().checkpoint, store=files.store.uri.split(":", 1)[0]):
            return await self._persist(files.put_checkpoint, self.job_id, self.lease.epoch, done, latents)

    async def _release_after_cancel(self) -> None:
        """The run was cancelled mid-call while draining: let a write in flight land, then release the
        job at its last recorded checkpoint."""
        if self._write is not None:
            await asyncio.wait([self._write])
        if self.let_go:  # the write in flight ended the job (or released it): nothing to give back
            return
        try:
            await self._persist(self.ctx.jobs.release, self.lease, {"type": "released"})
            self.let_go = True
            metrics().releases.inc()
            log_job_event("released", self.job_id, step=None)
        except LeaseLost as lost:  # taken over, or the write in flight ended the job: nothing to give back
            logger.warning("job %s: not released: %s", self.job_id, lost)
            await self._forget_if_gone()
        except Exception:  # an outage: the lease expires and the job is adopted anyway
            logger.exception("job %s: could not release", self.job_id)

    async def _end(self, status: str, event: dict, *, error: dict | None = None, progress: int | None = None) -> None:
        """The final write (with its webhook), then the checkpoints go; a deleted job goes entirely."""
        ctx, job = self.ctx, self.lease.job
        url = job.webhook_url or ctx.webhook_url
        signals = await self._persist(ctx.jobs.finish, self.lease, status, event, error=error, progress=progress,
                                      retention_s=ctx.retention_s, webhook=delivery(job.id, status, url) if url else None)
        self.let_go = True
        reason = (error or {}).get("code") or event.get("reason") or ""
        metrics().jobs_finished.inc(tags={**self._tags, "status": status, "reason": reason})
        log_job_event("finished", job.id, status=status, reason=reason,
                      seconds=round(time.time() - (job.started_at or job.created_at), 3))
        # The job has ended: a cleanup that fails is logged, never turned into a failure of the job (its
        # checkpoints then stay until the job expires; the sweep deletes every file of it).
        try:
            await self._persist(ctx.files.delete_checkpoints, job.id)
            if signals.delete:
                await self._persist(ctx.files.delete_all, job.id)
                await self._persist(ctx.jobs.delete, job.id)
        except Exception:
            logger.exception("job %s: cleaning up after its end failed", job.id)

    async def _fail(self, exc: Exception) -> None:
        if isinstance(exc, StageFailed):
            error = {"code": exc.code, "message": str(exc)}
        elif isinstance(exc, InvalidRequest):
            error = {"code": "invalid_request", "message": str(exc), "param": exc.field}
        else:
            logger.exception("job %s failed", self.job_id)
            error = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
        try:
            await self._end("failed", {"type": "failed", "error": error}, error=error)
        except LeaseLost as lost:
            logger.warning("job %s: %s; not recording the failure", self.job_id, lost)
        except Exception:
            logger.exception("job %s: could not record its failure", self.job_id)
