"""Router deployment: the OpenAI-compatible HTTP API.

`POST /v1/videos` takes JSON or multipart (uploads), checks every field and every medium before a job
is accepted, stores the inputs in the blob store and queues the job in the database, where a `Runner`
replica claims it. Pusa's parameters ride along as extra fields; `input_reference` means i2v. Progress is
readable as the job object, as Server-Sent Events (from any router replica), or as a synchronous event
stream. Routers keep no job state: any replica answers for any job.
"""

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve.handle import DeploymentHandle
from sqlalchemy.exc import InterfaceError, OperationalError

from pusa_model import media
from pusa_model.errors import InvalidRequest
from pusa_model.presets import get_preset
from pusa_model.request import GenerationPlan, parse_request, plan_request

from .db import open_database
from .event_stream import job_events, sse
from .job_files import RESULT_FILES, JobFiles
from .job_store import IdempotencyConflict, JobStore
from .jobs import TERMINAL, Job, job_created_at, new_job_id
from .observability import log_job_event, metrics
from .openai_api import (MODEL_NAME, ApiError, Submission, check_idempotency_key, check_webhook_url,
                         request_fingerprint)
from .storage import StoreUnavailable, open_store
from .webhooks import WebhookSettings

logger = logging.getLogger("ray.serve")

app = FastAPI(title="Pusa video generation", version="1")


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    metrics().requests_rejected.inc(tags={"code": str(exc.status), "type": exc.kind})
    return exc.response()


@app.exception_handler(OperationalError)
@app.exception_handler(InterfaceError)
@app.exception_handler(StoreUnavailable)
async def _unavailable(_: Request, exc: Exception) -> JSONResponse:
    logger.warning("request failed: %s unavailable: %s", "store" if isinstance(exc, StoreUnavailable) else "database", exc)
    return await _api_error(_, ApiError(503, "the job database or store is briefly unavailable; retry",
                                        kind="service_unavailable", headers={"Retry-After": "5"}))


class ApiSettings(BaseModel):
    """App arg ``api``: limits and timings of the HTTP API."""

    model_config = ConfigDict(extra="forbid")

    max_upload_bytes: int = 64 << 20
    max_queued_jobs: int = 32  # jobs waiting for a runner, all routers together; more: 429
    retry_after_s: int = 30
    event_poll_s: float = 0.25  # how often an SSE stream reads new events
    keepalive_s: float = 15.0  # longest silence on an SSE stream
    stream_grace_s: float = 60.0  # a job made by /v1/videos/stream survives this long without a client


def job_plan(plan: GenerationPlan) -> dict:
    """The plan fields a job record keeps (sizes, seed, steps) for views and for rebuilding the plan."""
    return {"width": plan.width, "height": plan.height, "frames": plan.frames, "fps": plan.request.fps,
            "seed": plan.seed, "steps": plan.request.steps, "task": plan.request.task,
            "latent_frames": plan.latent_frames}


@serve.deployment(name="Router")
@serve.ingress(app)
class Router:
    """HTTP ingress: validates requests, queues jobs, reports them."""

    def __init__(
        self, runner: DeploymentHandle, preset: str = "tiny", store: str = "data",
        database: str = "sqlite:///data/jobs.db", api: dict | None = None, webhooks: dict | None = None,
    ) -> None:
        self.preset = get_preset(preset)
        self.jobs = JobStore(open_database(database))
        self.files = JobFiles(open_store(store))
        self.runner = runner
        self.settings = ApiSettings.model_validate(api or {})
        self.webhooks_signed = WebhookSettings.model_validate(webhooks or {}).secret() is not None
        self._wakes: set[asyncio.Task] = set()

    # -- helpers -------------------------------------------------------------------------------

    async def _get(self, video_id: str) -> Job:
        try:
            return await asyncio.to_thread(self.jobs.get, video_id)
        except KeyError:
            raise ApiError(404, f"no video with id {video_id!r}", param="video_id", kind="not_found") from None

    async def _view(self, job: Job) -> dict:
        return job.to_openai(queue_position=await asyncio.to_thread(self.jobs.queue_position, job))

    async def _check_media(self, plan: GenerationPlan, media_bytes: dict[str, bytes]) -> None:
        """Decode every medium now, so a bad upload fails the request rather than the job."""
        def check() -> None:
            for name, data in media_bytes.items():
                if name == "video":
                    media.load_video(data, plan.width, plan.height, plan.video_frames_needed or 1, field=name,
                                     from_end=plan.request.video_anchor == "end")
                else:
                    media.load_image(data, plan.width, plan.height, field=name)
        await asyncio.to_thread(check)

    def _options(self, sub: Submission) -> dict:
        options = {}
        if sub.options.get("webhook_url") is not None:
            options["webhook_url"] = check_webhook_url(sub.options["webhook_url"])
            if not self.webhooks_signed:
                raise InvalidRequest("webhook_url", "this deployment has no webhook signing secret configured")
        return options

    async def _accept(self, sub: Submission, data: dict, request: Request, extended_from: str | None = None,
                      interactive: bool = False) -> Job:
        """Validate, deduplicate by ``Idempotency-Key``, check the queue's room, store the inputs, queue."""
        try:
            plan = plan_request(parse_request(data), self.preset)
            options = self._options(sub)
            key = check_idempotency_key(request.headers.get("idempotency-key"))
            await self._check_media(plan, sub.media)
        except InvalidRequest as exc:
            raise ApiError.invalid(exc) from None
        spec = plan.request.model_dump()
        fingerprint = request_fingerprint(spec, sub.media, {**options, "extended_from": extended_from}) if key else None
        if key:
            existing = await asyncio.to_thread(self.jobs.find_idempotent, "", key)
            if existing is not None:
                return self._same_request(existing, fingerprint)
        queued = await asyncio.to_thread(self.jobs.queued_count)
        if queued >= self.settings.max_queued_jobs:
            raise ApiError(429, "the queue is full; retry later", kind="rate_limit_exceeded",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        job_id = new_job_id()
        inputs = {name: await asyncio.to_thread(self.files.put_input, job_id, name, data_bytes)
                  for name, data_bytes in sub.media.items()}
        job = Job(id=job_id, created_at=job_created_at(job_id), request=spec, plan=job_plan(plan), inputs=inputs,
                  extended_from=extended_from, idempotency_key=key, request_hash=fingerprint, **options)
        grace = self.settings.stream_grace_s if interactive else None
        try:
            stored = await asyncio.to_thread(self.jobs.create, job, {"type": "queued", "position": queued + 1}, grace)
        except IdempotencyConflict:
            stored = None
        if stored is None or stored.id != job_id:  # a concurrent request with the same key won
            await asyncio.to_thread(self.files.delete_all, job_id)
            return self._same_request(stored or await asyncio.to_thread(self.jobs.find_idempotent, "", key), fingerprint)
        metrics().jobs_accepted.inc(tags={"task": spec["task"], "preset": self.preset.name})
        log_job_event("accepted", job_id, task=spec["task"], size=f"{plan.width}x{plan.height}", frames=plan.frames,
                      steps=plan.request.steps, queued=queued + 1)
        self._wake_a_runner()
        return stored

    @staticmethod
    def _same_request(existing: Job, fingerprint: str | None) -> Job:
        if existing.request_hash != fingerprint:
            raise ApiError(409, "this Idempotency-Key was used for a different request", param="Idempotency-Key",
                           kind="idempotency_error")
        return existing

    def _wake_a_runner(self) -> None:
        """Tell one runner replica there is work (they also poll, so a lost wake-up only costs latency)."""
        async def wake() -> None:
            try:
                await self.runner.wake.remote()
            except Exception as exc:
                logger.warning("could not wake a runner: %r", exc)
        task = asyncio.create_task(wake())
        self._wakes.add(task)
        task.add_done_callback(self._wakes.discard)

    async def _source_video(self, video_id: str) -> bytes:
        """The MP4 of a completed job, as the input of a new one."""
        job = await self._get(video_id)
        if job.status != "completed":
            raise ApiError(409, f"video {video_id} is {job.status}, not completed", param="video")
        return await asyncio.to_thread(self.files.store.get, self.files.result_key(video_id, "video"))

    async def _generation_data(self, sub: Submission) -> dict:
        try:
            data = sub.generation_data()
        except InvalidRequest as exc:
            raise ApiError.invalid(exc) from None
        if isinstance(data.get("video"), dict) or str(data.get("video", "")).startswith("video_"):
            ref = data["video"]
            video_id = ref.get("id") if isinstance(ref, dict) else ref
            if not isinstance(video_id, str):
                raise ApiError(400, 'video: expected {"id": "video_..."}, a video id or an upload', param="video")
            sub.media["video"] = await self._source_video(video_id)
            data["video"] = "video"
        return data

    def _events(self, video_id: str, after: int) -> object:
        s = self.settings
        return job_events(self.jobs, video_id, after, poll_s=s.event_poll_s, keepalive_s=s.keepalive_s,
                          grace_s=s.stream_grace_s)

    # -- API -----------------------------------------------------------------------------------

    @app.post("/v1/videos")
    async def create(self, request: Request) -> dict:
        """Queue a generation job (JSON or multipart). An ``Idempotency-Key`` header makes a retried
        request return the job the first one made."""
        sub = await Submission.read(request, self.settings.max_upload_bytes)
        return await self._view(await self._accept(sub, await self._generation_data(sub), request))

    @app.post("/v1/videos/extensions")
    async def extend(self, request: Request) -> dict:
        """Continue a completed job's video (by id) or an uploaded one: Pusa's v2v extension,
        conditioned on the source's last frames."""
        sub = await Submission.read(request, self.settings.max_upload_bytes)
        if "video" not in sub.fields:
            raise ApiError(400, "video: give the id of a completed video or upload one", param="video")
        sub.fields.setdefault("task", ["v2v"])
        sub.fields.setdefault("v2v_mode", ["extension"])
        sub.fields.setdefault("video_anchor", ["end"])
        data = await self._generation_data(sub)
        ref = sub.fields["video"][-1]
        source_id = ref.get("id") if isinstance(ref, dict) else ref if isinstance(ref, str) and ref.startswith("video_") else None
        return await self._view(await self._accept(sub, data, request, extended_from=source_id))

    @app.post("/v1/videos/stream")
    async def create_streaming(self, request: Request) -> StreamingResponse:
        """Queue a job and stream its events until it ends. A client that drops the stream may resume it
        at ``/v1/videos/{id}/events``; a job nobody streams for ``stream_grace_s`` is cancelled."""
        sub = await Submission.read(request, self.settings.max_upload_bytes)
        job = await self._accept(sub, await self._generation_data(sub), request, interactive=True)
        created = await self._view(job)

        async def stream():
            yield sse("created", created)
            async for frame in self._events(job.id, -1):
                yield frame

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/v1/videos")
    async def list_videos(self, limit: int = 20, after: str | None = None, order: str = "desc") -> dict:
        if not 1 <= limit <= 100:
            raise ApiError(400, "limit: must be between 1 and 100", param="limit")
        if order not in ("asc", "desc"):
            raise ApiError(400, "order: must be asc or desc", param="order")
        try:
            page = await asyncio.to_thread(self.jobs.list, limit + 1, after, order)
        except KeyError:
            raise ApiError(400, "after: must be the id of a video", param="after") from None
        data = [job.to_openai() for job in page[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(page) > limit}

    @app.get("/v1/videos/{video_id}")
    async def retrieve(self, video_id: str) -> dict:
        return await self._view(await self._get(video_id))

    @app.get("/v1/videos/{video_id}/content")
    async def content(self, video_id: str, variant: str = "video") -> Response:
        if variant not in RESULT_FILES:
            raise ApiError(400, f"variant: must be one of {', '.join(RESULT_FILES)}", param="variant")
        job = await self._get(video_id)
        if job.status != "completed":
            raise ApiError(409, f"video {video_id} is {job.status}, not completed", param="video_id")
        data = await asyncio.to_thread(self.files.store.get, self.files.result_key(video_id, variant))
        return Response(data, media_type=RESULT_FILES[variant][1])

    @app.get("/v1/videos/{video_id}/events")
    async def events(self, request: Request, video_id: str) -> StreamingResponse:
        """Server-Sent Events of the job; resumes after the ``Last-Event-ID`` header if given."""
        await self._get(video_id)
        try:
            after = int(request.headers.get("last-event-id", -1))
        except ValueError:
            raise ApiError(400, "Last-Event-ID: must be an event id (an integer)", param="Last-Event-ID") from None
        return StreamingResponse(self._events(video_id, after), media_type="text/event-stream")

    @app.post("/v1/videos/{video_id}/cancel")
    async def cancel(self, video_id: str) -> dict:
        """Cancel a queued job now, a running one after its current step (a no-op once it ended)."""
        job = await self._get(video_id)
        if job.status not in TERMINAL:
            await asyncio.to_thread(self.jobs.request_cancel, video_id)
        return await self._view(await self._get(video_id))

    @app.delete("/v1/videos/{video_id}")
    async def delete(self, video_id: str) -> dict:
        """Delete a video and its files; a running one is cancelled and removed once it stops."""
        await self._get(video_id)
        try:
            ended = await asyncio.to_thread(self.jobs.request_delete, video_id)
        except KeyError:
            raise ApiError(404, f"no video with id {video_id!r}", param="video_id", kind="not_found") from None
        if ended:
            await asyncio.to_thread(self.files.delete_all, video_id)
            await asyncio.to_thread(self.jobs.delete, video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "owned_by": "pusa"}]}

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "preset": self.preset.name, "store": self.files.store.uri,
                "database": self.jobs.db.dialect}
