"""The HTTP API's shapes as OpenAPI documents them: request bodies (JSON and multipart), the `Video`
object, lists, errors. The routes read bodies themselves (`openai_api.read_submission`, which also takes
the OpenAI SDK's form encodings); these models describe the wire format for clients and for fuzzing.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pusa_jobs.batches import BatchStatus
from pusa_jobs.jobs import Status
from pusa_jobs.submission import MODEL_NAME
from pusa_model.request_schema import MAX_SIDE, GenerationRequest

SIZE_PATTERN = r"^[0-9]{2,4}x[0-9]{2,4}$"


class VideoId(BaseModel):
    id: str = Field(description="the id of a completed video of yours")


class ImageUrl(BaseModel):
    image_url: str = Field(description="a data URL: data:image/png;base64,...")


class VideoCreate(GenerationRequest):
    """``POST /v1/videos``: OpenAI's fields (model, size, seconds, input_reference) and Pusa's. Images and
    videos are data URLs in JSON, files in multipart; ``video`` may also name a completed video."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"additionalProperties": False})

    model: Literal["pusa-v1", "pusa-wan2.2"] = Field(default=MODEL_NAME, description=(
        "pusa-v1, or pusa-wan2.2 where the deployment serves it (GET /v1/models)"))
    size: str | None = Field(default=None, pattern=SIZE_PATTERN,
                             description=f"WIDTHxHEIGHT, multiples of 16 up to {MAX_SIDE}")
    seconds: float | None = Field(default=None, gt=0, le=60, description="duration; frames = seconds × fps")
    input_reference: str | ImageUrl | None = Field(default=None, description="an image: image-to-video")
    video: str | VideoId | None = Field(default=None, description="a video: a data URL, an upload or a video id")
    webhook_url: str | None = Field(default=None, max_length=2048, description="where to POST the job's ending")


class VideoExtend(VideoCreate):
    """``POST /v1/videos/extensions``: continue ``video`` (required) from its last frames."""

    video: str | VideoId = Field(description="a completed video's id, or an uploaded video")


class PusaView(BaseModel):
    task: str | None
    seed: int | None
    steps: int | None
    windows: int = Field(description="windows of a long video (1: one window); it runs steps x windows steps")
    frames: int
    fps: int
    queue_position: int | None
    extended_from: str | None
    cost_gpu_s: float | None = Field(description="the estimate the job was admitted and charged with")
    urls: dict[str, Any] | None = Field(default=None, description="short-lived URLs of a completed job's files")


class Video(BaseModel):
    """OpenAI's `Video` object, Pusa's own fields under ``pusa``."""

    id: str
    object: Literal["video"]
    created_at: int
    completed_at: int | None
    expires_at: int | None
    status: Status
    progress: int
    model: str
    prompt: str | None
    seconds: str
    size: str
    error: dict[str, Any] | None
    remixed_from_video_id: str | None
    pusa: PusaView


class VideoList(BaseModel):
    object: Literal["list"]
    data: list[Video]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"]
    deleted: bool


class Model(BaseModel):
    id: str
    object: Literal["model"]
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class FileObject(BaseModel):
    """OpenAI's `FileObject`: a batch input file, or a batch's output or error file."""

    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["processed"]
    expires_at: int | None
    status_details: str | None


class FileList(BaseModel):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


class FileUpload(BaseModel):
    """``POST /v1/files`` (multipart): a JSONL of ``{custom_id, method: "POST", url: "/v1/videos", body}``
    lines, bodies as ``POST /v1/videos`` takes them in JSON (media as data URLs)."""

    file: bytes = Field(json_schema_extra={"format": "binary"})
    purpose: Literal["batch"]


class BatchCreate(BaseModel):
    """``POST /v1/batches``."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=64, description="a file uploaded with purpose batch")
    endpoint: Literal["/v1/videos"]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchObject(BaseModel):
    """OpenAI's `Batch` object, Pusa's cost estimate under ``pusa``."""

    id: str
    object: Literal["batch"]
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None
    error_file_id: str | None
    errors: dict[str, Any] | None
    created_at: int
    expires_at: int | None
    in_progress_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None
    pusa: dict[str, Any]


class BatchList(BaseModel):
    object: Literal["list"]
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int | str | None


class Error(BaseModel):
    """OpenAI's error shape."""

    error: ErrorDetail


def _error(description: str) -> dict:
    return {"model": Error, "description": description}


ERRORS = {
    400: _error("a field is invalid (`param` names it)"),
    401: _error("no valid API key"),
    404: _error("no such video, file or batch for this key"),
    409: _error("the video is not in a state that allows this"),
    413: _error("the body or its uploads are too large"),
    429: _error("a quota or the queue is full (see Retry-After)"),
    503: _error("the job database or store is briefly unavailable (see Retry-After)"),
}


def responses(model: type[BaseModel] | None = None, *codes: int, media: dict | None = None) -> dict:
    """An operation's documented responses: 200 with `model` (or `media` types) and error `codes`."""
    ok: dict[str, Any] = {"model": model} if model is not None else {"content": media}
    return {200: {**ok, "description": "OK"}, **{code: ERRORS[code] for code in (401, *codes)}}


def _inline(node: Any, defs: dict) -> Any:
    """`node` with every ``#/$defs/...`` reference replaced by the definition itself."""
    if isinstance(node, dict):
        ref = node.get("$ref", "")
        if ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {key: _inline(value, defs) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    return node


def request_body(model: type[BaseModel]) -> dict:
    """``openapi_extra`` for a body read by hand: the model as JSON, and as multipart with media files."""
    schema = model.model_json_schema()
    schema = _inline(schema, schema.pop("$defs", {}))
    multipart = {"type": "object", "required": schema.get("required", []), "properties": {
        **{name: {"type": "string"} for name in schema["properties"]},
        "input_reference": {"type": "string", "format": "binary"},
        "video": {"type": "string", "format": "binary"},
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
    }}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema}, "multipart/form-data": {"schema": multipart}}}}
