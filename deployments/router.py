"""Router deployment: the OpenAI-compatible HTTP API.

`POST /v1/videos` takes JSON or multipart (uploads), checks every field and every medium before a job
is accepted, stores the inputs in the blob store and queues the job in the database, where a `Runner`
replica claims it. Pusa's parameters ride along as extra fields; `input_reference` means i2v. Progress is
readable as the job object, as Server-Sent Events (from any router replica), or as a synchronous event
stream. Routers keep no job state: any replica answers for any job.
"""

import asyncio
import logging

from typing import Literal

from fastapi import FastAPI, Header, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from ray import serve
from ray.serve.handle import DeploymentHandle
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pusa_jobs.api_keys import Caller, KeyStore
from pusa_jobs.batches import BatchStore
from pusa_jobs.db import open_database
from pusa_jobs.job_files import RESULT_FILES, JobFiles
from pusa_jobs.job_store import IdempotencyConflict, JobStore
from pusa_jobs.jobs import TERMINAL, Job, job_created_at, job_plan, new_job_id
from pusa_jobs.observability import log_job_event, metrics
from pusa_jobs.quotas import QuotaExceeded
from pusa_jobs.storage import StoreUnavailable, open_store
from pusa_jobs.submission import MODEL_NAME, Submission
from pusa_jobs.webhooks import WebhookSettings, receiver_problem
from pusa_model import media
from pusa_model.errors import InvalidRequest
from pusa_model.loras import registries_by_model
from pusa_model.presets import get_preset
from pusa_model.request import GenerationPlan, parse_request, plan_request

from .admission import Admission, ApiSettings, CrossSiteGate, bearer, check_exposure, owned, proxy_host, quota_error
from .api_schema import ModelList, Video, VideoCreate, VideoDeleted, VideoExtend, VideoList, request_body, responses
from .batch_api import BatchRoutes, batch_routes
from .event_stream import job_events, sse
from .loading import ROUTER_SURGE_PERCENT, LoadingGate, Readiness
from .openai_api import ApiError, check_idempotency_key, check_webhook_url, read_submission, request_fingerprint
from .web import WebRoutes, web_files, web_routes

logger = logging.getLogger("ray.serve")

app = FastAPI(title="Pusa video generation", version="1")
IDEMPOTENCY_KEY = Header(default=None, alias="Idempotency-Key",
                         description="a retried request with the same key returns the first one's job")
EVENT_STREAM = {"text/event-stream": {"schema": {  # one event (OpenAPI 3.1: `schema` describes each)
    "type": "object", "properties": {"event": {"type": "string"}, "id": {"type": "string"},
                                     "data": {"type": "string", "contentMediaType": "application/json"}}}}}
RESULT_MEDIA = {media_type: {"schema": {"type": "string", "format": "binary"}} for _, media_type in RESULT_FILES.values()}


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    metrics().requests_rejected.inc(tags={"code": str(exc.status), "type": exc.kind})
    return exc.response()


@app.exception_handler(RequestValidationError)
async def _invalid_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's checks of query parameters and headers, as OpenAI's 400."""
    first = exc.errors()[0]
    param = str(first["loc"][-1]) if first.get("loc") else None
    return await _api_error(request, ApiError(400, f"{param}: {first['msg']}", param=param))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own refusals (a body it cannot parse, an unknown route or method) in OpenAI's shape."""
    return await _api_error(request, ApiError(exc.status_code, str(exc.detail), headers=exc.headers))


@app.exception_handler(OperationalError)
@app.exception_handler(InterfaceError)
@app.exception_handler(StoreUnavailable)
async def _unavailable(_: Request, exc: Exception) -> JSONResponse:
    logger.warning("request failed: %s unavailable: %s", "store" if isinstance(exc, StoreUnavailable) else "database", exc)
    return await _api_error(_, ApiError(503, "the job database or store is briefly unavailable; retry",
                                        kind="service_unavailable", headers={"Retry-After": "5"}))


app.add_middleware(LoadingGate)  # 503 "loading" on the API, /health and the page until every deployment runs
app.add_middleware(CrossSiteGate)  # without API keys: no changes from another origin's page
app.include_router(batch_routes)
app.include_router(web_routes)  # the web page at / and POST /v1/videos/plan
app.mount("/web", web_files(), name="web")


# A surge: a new version's replica starts before an old one stops, so the route always has a running
# replica through the swap from the loading Router `pusa-serve` deploys first (deployments/loading.py)
# and through redeploys.
@serve.deployment(name="Router", max_surge_percent=ROUTER_SURGE_PERCENT)
@serve.ingress(app)
class Router(BatchRoutes, WebRoutes):
    """HTTP ingress: authenticates, validates and admits requests, queues jobs, reports them. Until every
    other deployment of the application has a running replica it answers with the loading state
    (`deployments.loading`), without waiting on them."""

    def __init__(
        self, runner: DeploymentHandle, preset: str = "tiny", store: str = "data",
        database: str = "sqlite:///data/jobs.db", api: dict | None = None, webhooks: dict | None = None,
        loras: dict | None = None, retention_s: float = 7 * 86400, models: dict[str, str] | None = None,
        wan22_loras: dict | None = None,
    ) -> None:
        self.settings = ApiSettings.model_validate(api or {})
        # each model's registry: what a request's `loras` and mode "fast" resolve to
        self.registries = registries_by_model(loras, wan22_loras)
        check_exposure(self.settings.auth, proxy_host())
        if self.settings.auth == "none":
            logger.warning("API keys are off (api.auth: none): anyone who reaches the loopback address is admin")
        CrossSiteGate.enabled = self.settings.auth == "none"
        self.preset = get_preset(preset)  # pusa-v1's: /health's and the admission's default (a batch's: its model's, in self.presets)
        # the models this deployment serves, name -> preset (`AppArgs.models`)
        self.presets = {name: get_preset(p) for name, p in (models or {MODEL_NAME: preset}).items()}
        db = open_database(database)
        self.webhooks = WebhookSettings.model_validate(webhooks or {})
        # a job cancelled while queued ends here, kept and announced as a runner ends one
        self.jobs = JobStore(db, retention_s=retention_s,
                             webhook_url=self.webhooks.url if self.webhooks.secret() else None)
        self.batches = BatchStore(db)
        self.admission = Admission(self.settings, self.jobs, KeyStore(db), self.preset)
        self.files = JobFiles(open_store(store))
        self.runner = runner
        self._wakes: set[asyncio.Task] = set()
        self.readiness = LoadingGate.readiness = Readiness()

    # -- helpers -------------------------------------------------------------------------------

    async def _get(self, video_id: str, caller: Caller) -> Job:
        """The job, if it exists for `caller`: another key's job is a 404 like a missing one."""
        return await owned(self.jobs.get, video_id, caller, job_created_at, "video")

    def _result_url(self, job_id: str, variant: str) -> str | None:
        """A short-lived URL of a result file on the store's public endpoint (None for a folder store)."""
        return self.files.store.url(self.files.result_key(job_id, variant), self.settings.result_url_ttl_s)

    def _openai(self, job: Job, queue_position: int | None = None) -> dict:
        """The job's `Video` object; a completed job's files get short-lived URLs when the store has them."""
        view = job.to_openai(queue_position=queue_position)
        if job.status == "completed":
            urls = {variant: self._result_url(job.id, variant) for variant in RESULT_FILES}
            if all(urls.values()):
                view["pusa"]["urls"] = {**urls, "expires_in": self.settings.result_url_ttl_s}
        return view

    def _present_event(self, video_id: str, event: dict) -> dict:
        """A stored event as a client gets it: a completion carries a fresh URL of the video."""
        if event["type"] == "completed":
            return {**event, "url": self._result_url(video_id, "video") or event["url"]}
        return event

    async def _view(self, job: Job) -> dict:
        return self._openai(job, queue_position=await asyncio.to_thread(self.jobs.queue_position, job))

    async def _check_media(self, plan: GenerationPlan, media_bytes: dict[str, bytes]) -> None:
        """Decode every medium now, within the media limits and off the event loop, so a bad upload fails
        the request rather than the job."""
        limits = self.settings.media

        def check() -> None:
            for name, data in media_bytes.items():
                if name == "video":
                    media.load_video(data, plan.width, plan.height, plan.video_frames_needed or 1, field=name,
                                     from_end=plan.request.video_anchor == "end", limits=limits)
                else:
                    media.load_image(data, plan.width, plan.height, field=name, limits=limits)
        await asyncio.to_thread(check)

    async def _options(self, sub: Submission) -> dict:
        """The job options of the request (its own ``webhook_url``), checked."""
        options = {}
        if sub.options.get("webhook_url") is not None:
            url = options["webhook_url"] = check_webhook_url(sub.options["webhook_url"])
            if self.webhooks.secret() is None:
                raise InvalidRequest("webhook_url", "this deployment has no webhook signing secret configured")
            if not self.webhooks.allow_private_receivers and (problem := await asyncio.to_thread(receiver_problem, url)):
                raise InvalidRequest("webhook_url", problem)
        return options

    def _plan(self, sub: Submission, data: dict) -> GenerationPlan:
        """The plan of `data` on the model the request names (`sub.model`); `InvalidRequest` naming
        ``model`` when this deployment does not serve it."""
        preset = self.presets.get(sub.model)
        if preset is None:
            raise InvalidRequest("model", f"model {sub.model!r} is not served by this deployment "
                                          f"(served: {', '.join(self.presets)})")
        return plan_request(parse_request(data), preset, loras=self.registries[sub.model])

    async def _accept(self, caller: Caller, sub: Submission, data: dict, idempotency_key: str | None,
                      extended_from: str | None = None, interactive: bool = False) -> Job:
        """Validate; deduplicate by ``Idempotency-Key``; price the request and check the caller's quotas
        and the queue's room; only then decode the media, store them and queue the job, charging it."""
        try:
            plan = self._plan(sub, data)
            options = await self._options(sub)
            key = check_idempotency_key(idempotency_key)
        except InvalidRequest as exc:
            raise ApiError.invalid(exc) from None
        spec = plan.request.model_dump()
        fingerprint = request_fingerprint(spec, sub.media, {**options, "extended_from": extended_from}) if key else None
        if key:
            existing = await asyncio.to_thread(self.jobs.find_idempotent, caller.owner, key)
            if existing is not None:
                return self._same_request(existing, fingerprint)
        cost = self.admission.price(plan, self.presets[sub.model])
        charge = await self.admission.admit(caller, cost)
        try:
            await self._check_media(plan, sub.media)
        except InvalidRequest as exc:
            raise ApiError.invalid(exc) from None
        job_id = new_job_id()
        inputs = {name: await asyncio.to_thread(self.files.put_input, job_id, name, data_bytes)
                  for name, data_bytes in sub.media.items()}
        job = Job(id=job_id, owner=caller.owner, created_at=job_created_at(job_id), model=sub.model,
                  request=spec, plan=job_plan(plan, round(cost, 3)), inputs=inputs, extended_from=extended_from,
                  idempotency_key=key, request_hash=fingerprint, **options)
        grace = self.settings.stream_grace_s if interactive else None
        queued = await asyncio.to_thread(self.jobs.queued_count)
        try:
            stored = await asyncio.to_thread(self.jobs.create, job, {"type": "queued", "position": queued + 1}, grace,
                                             charge)
        except IdempotencyConflict:
            stored = None
        except QuotaExceeded as exc:  # another request of this key got there first
            await asyncio.to_thread(self.files.delete_all, job_id)
            raise quota_error(exc) from None
        if stored is None or stored.id != job_id:  # a concurrent request with the same key won
            await asyncio.to_thread(self.files.delete_all, job_id)
            return self._same_request(stored or await asyncio.to_thread(self.jobs.find_idempotent, caller.owner, key),
                                      fingerprint)
        metrics().jobs_accepted.inc(tags={"task": spec["task"], "preset": self.presets[sub.model].name})
        log_job_event("accepted", job_id, task=spec["task"], size=f"{plan.width}x{plan.height}", frames=plan.frames,
                      steps=plan.request.steps, queued=queued + 1, key_id=caller.key_id or None,
                      cost_gpu_s=round(cost, 3))
        self._wake_a_runner()
        return stored

    @staticmethod
    def _same_request(existing: Job, fingerprint: str | None) -> Job:
        if existing.request_hash != fingerprint:
            raise ApiError(409, "this Idempotency-Key was used for a different request", param="Idempotency-Key",
                           kind="idempotency_error")
        return existing

    def _wake_a_runner(self, batch: bool = False) -> None:
        """Tell one runner replica there is work, a job or (`batch`) a batch (they also poll, so a lost
        wake-up only costs latency)."""
        async def wake() -> None:
            try:
                await self.runner.wake.remote(batch)
            except Exception as exc:
                logger.warning("could not wake a runner: %r", exc)
        task = asyncio.create_task(wake())
        self._wakes.add(task)
        task.add_done_callback(self._wakes.discard)

    async def _source_video(self, video_id: str, caller: Caller) -> bytes:
        """The MP4 of a completed job the caller may see, as the input of a new one."""
        job = await self._get(video_id, caller)
        if job.status != "completed":
            raise ApiError(409, f"video {video_id} is {job.status}, not completed", param="video")
        return await asyncio.to_thread(self.files.store.get, self.files.result_key(video_id, "video"))

    async def _generation_data(self, sub: Submission, caller: Caller) -> dict:
        try:
            data = sub.generation_data()
        except InvalidRequest as exc:
            raise ApiError.invalid(exc) from None
        if isinstance(data.get("video"), dict) or str(data.get("video", "")).startswith("video_"):
            ref = data["video"]
            video_id = ref.get("id") if isinstance(ref, dict) else ref
            if not isinstance(video_id, str):
                raise ApiError(400, 'video: expected {"id": "video_..."}, a video id or an upload', param="video")
            sub.media["video"] = await self._source_video(video_id, caller)
            data["video"] = "video"
        return data

    def _events(self, video_id: str, after: int) -> object:
        s = self.settings
        return job_events(self.jobs, video_id, after, poll_s=s.event_poll_s, keepalive_s=s.keepalive_s,
                          grace_s=s.stream_grace_s,
                          present=lambda event: self._present_event(video_id, event))

    # -- API -----------------------------------------------------------------------------------

    @app.post("/v1/videos", response_model=None, responses=responses(Video, 400, 404, 409, 413, 429, 503),
              openapi_extra=request_body(VideoCreate))
    async def create(self, request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer),
                     idempotency_key: str | None = IDEMPOTENCY_KEY) -> dict:
        """Queue a generation job (JSON or multipart). An ``Idempotency-Key`` header makes a retried
        request return the job the first one made."""
        caller = await self.admission.caller(credentials)
        sub = await read_submission(request, self.settings.max_upload_bytes)
        data = await self._generation_data(sub, caller)
        return await self._view(await self._accept(caller, sub, data, idempotency_key))

    @app.post("/v1/videos/extensions", response_model=None,
              responses=responses(Video, 400, 404, 409, 413, 429, 503), openapi_extra=request_body(VideoExtend))
    async def extend(self, request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer),
                     idempotency_key: str | None = IDEMPOTENCY_KEY) -> dict:
        """Continue a completed job's video (by id) or an uploaded one: Pusa's v2v extension,
        conditioned on the source's last frames; on the model of the video it continues unless the request
        names one (an upload's: pusa-v1's, as any request's)."""
        caller = await self.admission.caller(credentials)
        sub = await read_submission(request, self.settings.max_upload_bytes)
        if "video" not in sub.fields:
            raise ApiError(400, "video: give the id of a completed video or upload one", param="video")
        sub.fields.setdefault("task", ["v2v"])
        sub.fields.setdefault("v2v_mode", ["extension"])
        sub.fields.setdefault("video_anchor", ["end"])
        ref = sub.fields["video"][-1]
        source_id = ref.get("id") if isinstance(ref, dict) else ref if isinstance(ref, str) and ref.startswith("video_") else None
        if source_id is not None and isinstance(source_id, str) and "model" not in sub.fields:
            sub.fields["model"] = [(await self._get(source_id, caller)).model]
        data = await self._generation_data(sub, caller)
        return await self._view(await self._accept(caller, sub, data, idempotency_key, extended_from=source_id))

    @app.post("/v1/videos/stream", response_class=StreamingResponse,
              responses=responses(None, 400, 404, 409, 413, 429, 503, media=EVENT_STREAM),
              openapi_extra=request_body(VideoCreate))
    async def create_streaming(self, request: Request,
                               credentials: HTTPAuthorizationCredentials | None = Security(bearer),
                               idempotency_key: str | None = IDEMPOTENCY_KEY) -> StreamingResponse:
        """Queue a job and stream its events until it ends. A client that drops the stream may resume it
        at ``/v1/videos/{id}/events``; a job nobody streams for ``stream_grace_s`` is cancelled."""
        caller = await self.admission.caller(credentials)
        sub = await read_submission(request, self.settings.max_upload_bytes)
        data = await self._generation_data(sub, caller)
        job = await self._accept(caller, sub, data, idempotency_key, interactive=True)
        created = await self._view(job)

        async def stream():
            yield sse("created", created)
            async for frame in self._events(job.id, -1):
                yield frame

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/v1/videos", response_model=None, responses=responses(VideoList, 400, 503))
    async def list_videos(self, limit: int = 20, after: str | None = None, order: Literal["asc", "desc"] = "desc",
                          credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> dict:
        """The caller's videos (an admin's: everyone's), newest first by default, a page at a time."""
        caller = await self.admission.caller(credentials)
        if not 1 <= limit <= 100:
            raise ApiError(400, "limit: must be between 1 and 100", param="limit")
        if order not in ("asc", "desc"):
            raise ApiError(400, "order: must be asc or desc", param="order")
        owner = None if caller.is_admin else caller.owner
        try:
            page = await asyncio.to_thread(self.jobs.list, limit + 1, after, order, owner)
        except KeyError:
            raise ApiError(400, "after: must be the id of a video", param="after") from None
        data = [self._openai(job) for job in page[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(page) > limit}

    @app.get("/v1/videos/{video_id}", response_model=None, responses=responses(Video, 404, 503))
    async def retrieve(self, video_id: str, credentials: HTTPAuthorizationCredentials | None = Security(bearer)
                       ) -> dict:
        caller = await self.admission.caller(credentials)
        return await self._view(await self._get(video_id, caller))

    @app.get("/v1/videos/{video_id}/content", response_class=Response,
             responses=responses(None, 400, 404, 409, 503, media=RESULT_MEDIA))
    async def content(self, video_id: str, variant: Literal["video", "thumbnail"] = "video",
                      segment: int | None = Query(default=None, ge=0, description="a window of a long video: "
                                                  "its MP4, as soon as its `segment` event was sent"),
                      credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> Response:
        caller = await self.admission.caller(credentials)
        if variant not in RESULT_FILES:
            raise ApiError(400, f"variant: must be one of {', '.join(RESULT_FILES)}", param="variant")
        if segment is not None and variant != "video":
            raise ApiError(400, "segment: a segment has only the video variant", param="segment")
        job = await self._get(video_id, caller)
        if segment is not None:
            key = self.files.window_key(video_id, segment)
            if not await asyncio.to_thread(self.files.store.exists, key):
                raise ApiError(409, f"segment {segment} of video {video_id} is not finished (or does not exist)",
                               param="segment")
        elif job.status != "completed":
            raise ApiError(409, f"video {video_id} is {job.status}, not completed", param="video_id")
        else:
            key = self.files.result_key(video_id, variant)
        data = await asyncio.to_thread(self.files.store.get, key)
        return Response(data, media_type=RESULT_FILES[variant][1])

    @app.get("/v1/videos/{video_id}/events", response_class=StreamingResponse,
             responses=responses(None, 400, 404, 503, media=EVENT_STREAM))
    async def events(self, video_id: str, credentials: HTTPAuthorizationCredentials | None = Security(bearer),
                     last_event_id: str | None = Header(default=None, alias="Last-Event-ID")) -> StreamingResponse:
        """Server-Sent Events of the job; resumes after the ``Last-Event-ID`` header if given."""
        caller = await self.admission.caller(credentials)
        await self._get(video_id, caller)
        try:
            after = int(last_event_id or -1)
        except ValueError:
            raise ApiError(400, "Last-Event-ID: must be an event id (an integer)", param="Last-Event-ID") from None
        return StreamingResponse(self._events(video_id, after), media_type="text/event-stream")

    @app.post("/v1/videos/{video_id}/cancel", response_model=None, responses=responses(Video, 404, 503))
    async def cancel(self, video_id: str, credentials: HTTPAuthorizationCredentials | None = Security(bearer)
                     ) -> dict:
        """Cancel a queued job now, a running one after its current step (a no-op once it ended)."""
        caller = await self.admission.caller(credentials)
        job = await self._get(video_id, caller)
        if job.status not in TERMINAL:
            await asyncio.to_thread(self.jobs.request_cancel, video_id)
        return await self._view(await self._get(video_id, caller))

    @app.delete("/v1/videos/{video_id}", response_model=None, responses=responses(VideoDeleted, 404, 503))
    async def delete(self, video_id: str, credentials: HTTPAuthorizationCredentials | None = Security(bearer)
                     ) -> dict:
        """Delete a video and its files; a running one is cancelled and removed once it stops."""
        caller = await self.admission.caller(credentials)
        await self._get(video_id, caller)
        try:
            ended = await asyncio.to_thread(self.jobs.request_delete, video_id)
        except KeyError:
            raise ApiError(404, f"no video with id {video_id!r}", param="video_id", kind="not_found") from None
        if ended:
            await asyncio.to_thread(self.files.delete_all, video_id)
            await asyncio.to_thread(self.jobs.delete, video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @app.get("/v1/models", response_model=None, responses=responses(ModelList))
    async def models(self, credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> dict:
        await self.admission.caller(credentials)
        return {"object": "list",
                "data": [{"id": name, "object": "model", "owned_by": "pusa"} for name in self.presets]}

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "preset": self.preset.name, "auth": self.settings.auth}
