"""Router deployment: the OpenAI-compatible HTTP API over the job runner.

`POST /v1/videos` takes JSON or multipart (uploads), checks every field and every medium before a job
is accepted, stores the inputs, and queues the job. Pusa's parameters ride along as extra fields;
`input_reference` means i2v. Progress is readable as the job object, as Server-Sent Events, or as a
synchronous event stream.
"""

import asyncio
import base64
import binascii
import json
import time
import uuid
from collections.abc import AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile

from pusa_model import media
from pusa_model.errors import InvalidRequest
from pusa_model.presets import get_preset
from pusa_model.request import MAX_SIDE, SIZE_MULTIPLE, GenerationPlan, parse_request, plan_request

from .jobs import TERMINAL, Job, JobStore, new_job_id
from .runner import JobRunner, RunnerSettings, new_job_plan
from .storage import open_store

MODEL_NAME = "pusa-v1"
LIST_FIELDS = ("images", "positions", "multipliers")
MEDIA_TYPES = {"video": "video/mp4", "thumbnail": "image/webp"}

app = FastAPI(title="Pusa video generation", version="1")


class ApiError(Exception):
    """An HTTP error in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    body = {"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.status}}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def _invalid(exc: InvalidRequest) -> ApiError:
    return ApiError(400, str(exc), param=exc.field)


def _decode_data_url(value: str, field: str) -> bytes:
    """``data:<type>;base64,<payload>`` -> bytes."""
    if not value.startswith("data:") or ";base64," not in value:
        raise InvalidRequest(field, "expected an upload or a base64 data URL (data:<type>;base64,...)")
    try:
        return base64.b64decode(value.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(field, "the data URL is not valid base64") from None


def _as_list(field: str, values: list) -> list:
    """Form values (repeated, or one comma-separated string) or a JSON list, as one list."""
    if len(values) == 1 and isinstance(values[0], list):
        return values[0]
    if len(values) == 1 and isinstance(values[0], str) and field != "images":
        return [v.strip() for v in values[0].split(",") if v.strip()]
    return values


class Submission:
    """A create/extend request split into generation parameters and media bytes."""

    def __init__(self) -> None:
        self.fields: dict[str, list] = {}
        self.media: dict[str, bytes] = {}

    @classmethod
    async def read(cls, request: Request, max_upload_bytes: int) -> "Submission":
        length = int(request.headers.get("content-length") or 0)
        if length > max_upload_bytes:
            raise ApiError(413, f"request body of {length} bytes exceeds the limit of {max_upload_bytes}",
                           kind="request_too_large")
        sub = cls()
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_part_size=max_upload_bytes)
            total = 0
            for key, value in form.multi_items():
                key = key.removesuffix("[]")
                name, bracket, inner = key.partition("[")
                if bracket and inner.endswith("]") and not isinstance(value, UploadFile):
                    # an object field as OpenAI's SDK sends it: `video[id]=...`, `input_reference[image_url]=...`
                    sub.fields.setdefault(name, []).append({inner[:-1]: value})
                elif isinstance(value, UploadFile):
                    data = await value.read()
                    total += len(data)
                    if total > max_upload_bytes:
                        raise ApiError(413, f"uploads exceed the limit of {max_upload_bytes} bytes",
                                       param=key, kind="request_too_large")
                    sub.fields.setdefault(key, []).append(data)
                else:
                    sub.fields.setdefault(key, []).append(value)
        else:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ApiError(400, "the body is neither JSON nor multipart/form-data") from None
            if not isinstance(body, dict):
                raise ApiError(400, "the JSON body must be an object")
            sub.fields = {k: [v] for k, v in body.items()}
        return sub

    def _media(self, field: str, value, index: int | None = None) -> str:
        """Keep an upload or data URL as media; return its field name for the request."""
        name = field if index is None else f"{field}[{index}]"
        if isinstance(value, dict) and "image_url" in value:  # OpenAI's image reference object
            value = value["image_url"]
        self.media[name] = value if isinstance(value, bytes) else _decode_data_url(str(value), name)
        return name

    def generation_data(self) -> dict:
        """The fields as `GenerationRequest` data, media replaced by their field names."""
        data: dict = {}
        for key, values in self.fields.items():
            data[key] = _as_list(key, values) if key in LIST_FIELDS else values[-1]
        model = data.pop("model", MODEL_NAME)
        if model != MODEL_NAME:
            raise InvalidRequest("model", f"unknown model {model!r} (available: {MODEL_NAME})")
        if "size" in data:
            size = str(data.pop("size"))
            try:
                data["width"], data["height"] = (int(v) for v in size.lower().split("x"))
            except ValueError:
                raise InvalidRequest("size", "expected WIDTHxHEIGHT, e.g. 832x480") from None
            for side in (data["width"], data["height"]):  # checked here so the error names `size`
                if side % SIZE_MULTIPLE or not SIZE_MULTIPLE <= side <= MAX_SIDE:
                    raise InvalidRequest("size", f"width and height must be multiples of {SIZE_MULTIPLE} "
                                                 f"from {SIZE_MULTIPLE} to {MAX_SIDE}, got {size}")
        if "seconds" in data:
            try:
                seconds = float(data.pop("seconds"))
            except ValueError:
                raise InvalidRequest("seconds", "expected a number of seconds") from None
            if "frames" not in data:
                fps = int(data.get("fps", 25))
                data["frames"] = 4 * max(0, round(seconds * fps / 4)) + 1
        reference = data.pop("input_reference", None)
        if reference is not None:
            data.setdefault("task", "i2v")
            data["images"] = [reference]
        if "images" in data:
            data["images"] = [self._media("images", v, i) for i, v in enumerate(data["images"])]
        if isinstance(data.get("video"), (bytes, str)) and not str(data.get("video", "")).startswith("video_"):
            data["video"] = self._media("video", data["video"])
        return data


@serve.deployment(name="Router")
@serve.ingress(app)
class Router:
    """HTTP ingress: validates requests, owns the jobs it accepts, drives them through the stages."""

    def __init__(
        self, text_encoder: DeploymentHandle, vae: DeploymentHandle, dit: DeploymentHandle,
        preset: str = "tiny", store: str = "data", max_upload_bytes: int = 64 << 20,
        event_poll_s: float = 0.25, runner: dict | None = None,
    ) -> None:
        self.preset = get_preset(preset)
        self.jobs = JobStore(open_store(store))
        self.max_upload_bytes = max_upload_bytes
        self.event_poll_s = event_poll_s
        self.runner = JobRunner(self.jobs, text_encoder, vae, dit, preset, owner=f"router-{uuid.uuid4().hex[:8]}",
                                settings=RunnerSettings(**(runner or {})))

    async def check_health(self) -> None:
        """Serve's periodic health check; also starts the runner's loops once the loop is up."""
        self.runner.start()

    # -- helpers -------------------------------------------------------------------------------

    async def _get(self, video_id: str) -> Job:
        try:
            return await asyncio.to_thread(self.jobs.get, video_id)
        except KeyError:
            raise ApiError(404, f"no video with id {video_id!r}", param="video_id", kind="not_found") from None

    def _view(self, job: Job) -> dict:
        return job.to_openai(queue_position=self.runner.queue_position(job.id))

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

    async def _accept(self, data: dict, media_bytes: dict[str, bytes], extended_from: str | None = None) -> Job:
        self.runner.start()
        try:
            plan = plan_request(parse_request(data), self.preset)
            await self._check_media(plan, media_bytes)
        except InvalidRequest as exc:
            raise _invalid(exc) from None
        if not self.runner.has_room():
            raise ApiError(429, "the queue is full; retry later", kind="rate_limit_exceeded",
                           headers={"Retry-After": str(self.runner.settings.retry_after_s)})
        job = Job(id=new_job_id(), created_at=time.time(), status="queued", progress=0,
                  request=plan.request.model_dump(), plan=new_job_plan(plan), extended_from=extended_from)
        for name, data_bytes in media_bytes.items():
            job.inputs[name] = await asyncio.to_thread(self.jobs.put_input, job.id, name, data_bytes)
        return await self.runner.submit(job)

    async def _source_video(self, video_id: str) -> bytes:
        """The MP4 of a completed job, as the input of a new one."""
        job = await self._get(video_id)
        if job.status != "completed":
            raise ApiError(409, f"video {video_id} is {job.status}, not completed", param="video")
        return await asyncio.to_thread(self.jobs.store.get, self.jobs.result_key(video_id, "video"))

    async def _events(self, video_id: str, after: int) -> AsyncIterator[str]:
        """SSE frames for the job's events after `after`, until a terminal event."""
        last_position = None
        while True:
            job = await self._get(video_id)
            for event in job.events:
                if event["seq"] > after:
                    after = event["seq"]
                    yield f"id: {event['seq']}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"
            position = self.runner.queue_position(video_id)
            if job.status == "queued" and position is not None and position != last_position:
                last_position = position
                yield f"event: queued\ndata: {json.dumps({'type': 'queued', 'position': position})}\n\n"
            if job.status in TERMINAL:
                return
            await asyncio.sleep(self.event_poll_s)

    # -- API -----------------------------------------------------------------------------------

    @app.post("/v1/videos")
    async def create(self, request: Request) -> dict:
        """Queue a generation job (JSON or multipart)."""
        sub = await Submission.read(request, self.max_upload_bytes)
        data = await self._generation_data(sub)
        return self._view(await self._accept(data, sub.media))

    async def _generation_data(self, sub: Submission) -> dict:
        try:
            data = sub.generation_data()
        except InvalidRequest as exc:
            raise _invalid(exc) from None
        if isinstance(data.get("video"), dict) or str(data.get("video", "")).startswith("video_"):
            ref = data["video"]
            video_id = ref.get("id") if isinstance(ref, dict) else ref
            if not isinstance(video_id, str):
                raise ApiError(400, 'video: expected {"id": "video_..."}, a video id or an upload', param="video")
            sub.media["video"] = await self._source_video(video_id)
            data["video"] = "video"
        return data

    @app.post("/v1/videos/extensions")
    async def extend(self, request: Request) -> dict:
        """Continue a completed job's video (by id) or an uploaded one: Pusa's v2v extension,
        conditioned on the source's last frames."""
        sub = await Submission.read(request, self.max_upload_bytes)
        if "video" not in sub.fields:
            raise ApiError(400, "video: give the id of a completed video or upload one", param="video")
        sub.fields.setdefault("task", ["v2v"])
        sub.fields.setdefault("v2v_mode", ["extension"])
        sub.fields.setdefault("video_anchor", ["end"])
        data = await self._generation_data(sub)
        ref = sub.fields["video"][-1]
        source_id = ref.get("id") if isinstance(ref, dict) else ref if isinstance(ref, str) and ref.startswith("video_") else None
        return self._view(await self._accept(data, sub.media, extended_from=source_id))

    @app.post("/v1/videos/stream")
    async def create_streaming(self, request: Request) -> StreamingResponse:
        """Queue a job and stream its events until it ends; a client that disconnects cancels it."""
        sub = await Submission.read(request, self.max_upload_bytes)
        job = await self._accept(await self._generation_data(sub), sub.media)

        async def stream() -> AsyncIterator[str]:
            finished = False
            try:
                yield f"event: created\ndata: {json.dumps(self._view(job))}\n\n"
                async for frame in self._events(job.id, -1):
                    yield frame
                finished = True
            finally:
                if not finished:  # the client went away; this task is being cancelled, so shield the cancel
                    with anyio.CancelScope(shield=True):
                        await self.runner.cancel(job.id)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/v1/videos")
    async def list_videos(self, limit: int = 20, after: str | None = None, order: str = "desc") -> dict:
        if not 1 <= limit <= 100:
            raise ApiError(400, "limit: must be between 1 and 100", param="limit")
        if order not in ("asc", "desc"):
            raise ApiError(400, "order: must be asc or desc", param="order")
        page = await asyncio.to_thread(self.jobs.list, limit + 1, after, order)
        data = [self._view(job) for job in page[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(page) > limit}

    @app.get("/v1/videos/{video_id}")
    async def retrieve(self, video_id: str) -> dict:
        return self._view(await self._get(video_id))

    @app.get("/v1/videos/{video_id}/content")
    async def content(self, video_id: str, variant: str = "video") -> Response:
        if variant not in MEDIA_TYPES:
            raise ApiError(400, f"variant: must be one of {', '.join(MEDIA_TYPES)}", param="variant")
        job = await self._get(video_id)
        if job.status != "completed":
            raise ApiError(409, f"video {video_id} is {job.status}, not completed", param="video_id")
        data = await asyncio.to_thread(self.jobs.store.get, self.jobs.result_key(video_id, variant))
        return Response(data, media_type=MEDIA_TYPES[variant])

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
        job = await self._get(video_id)
        if job.status not in TERMINAL:
            await self.runner.cancel(video_id)
        return self._view(await self._get(video_id))

    @app.delete("/v1/videos/{video_id}")
    async def delete(self, video_id: str) -> dict:
        """Delete a finished video and its files; an unfinished one is cancelled first and kept
        (as cancelled) until a later delete."""
        job = await self._get(video_id)
        if job.status not in TERMINAL:
            await self.runner.cancel(video_id)
            return {"id": video_id, "object": "video.deleted", "deleted": False, "status": "cancelled"}
        await asyncio.to_thread(self.jobs.delete, video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "owned_by": "pusa"}]}

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "preset": self.preset.name, "store": self.jobs.store.uri}
