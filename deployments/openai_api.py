"""The OpenAI video API's shapes, mapped onto Pusa's: request bodies (JSON, multipart with uploads, the
SDK's ``name[key]`` object fields, data URLs, ``size`` and ``seconds``) and errors.

A `Submission` is one create or extend request read off the wire: its fields, its media bytes, and the
job options that are not generation parameters (``webhook_url``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.types import Message, Receive

from pusa_model.errors import InvalidRequest
from pusa_model.request_schema import MAX_FRAMES, MAX_SIDE, SIZE_MULTIPLE

MODEL_NAME = "pusa-v1"
LIST_FIELDS = ("images", "positions", "multipliers", "extension_multipliers")
JOB_OPTIONS = ("webhook_url",)  # fields about the job rather than the video
MAX_URL_LENGTH = 2048
MAX_IDEMPOTENCY_KEY = 255  # the column's size


class ApiError(Exception):
    """An HTTP error in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None, code: str | int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers
        self.code = status if code is None else code

    @classmethod
    def invalid(cls, exc: InvalidRequest) -> "ApiError":
        return cls(400, str(exc), param=exc.field)

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def is_json(content_type: str) -> bool:
    """Whether a Content-Type names JSON (``application/json``, ``application/<x>+json``, any parameters)."""
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _decode_data_url(value: str, field: str) -> bytes:
    """``data:<type>;base64,<payload>`` -> bytes."""
    if not value.startswith("data:") or ";base64," not in value:
        raise InvalidRequest(field, "expected an upload or a base64 data URL (data:<type>;base64,...)")
    try:
        return base64.b64decode(value.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(field, "the data URL is not valid base64") from None


def _number(value: object, field: str) -> float:
    """A finite number (or its decimal string) as float, else `InvalidRequest` naming `field`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidRequest(field, "expected a number")
    try:
        number = float(value)
    except ValueError:
        raise InvalidRequest(field, "expected a number") from None
    if not math.isfinite(number):
        raise InvalidRequest(field, "expected a finite number")
    return number


def _as_list(field: str, values: list) -> list:
    """Form values (repeated, or one comma-separated string) or a JSON list, as one list."""
    if len(values) == 1 and isinstance(values[0], list):
        return values[0]
    if len(values) == 1 and isinstance(values[0], str) and field != "images":
        return [v.strip() for v in values[0].split(",") if v.strip()]
    return values


def check_webhook_url(value: object) -> str:
    """An absolute http(s) URL with a host, or `InvalidRequest` naming ``webhook_url``."""
    problem = f"expected an http:// or https:// URL with a host, of at most {MAX_URL_LENGTH} characters"
    if not isinstance(value, str) or len(value) > MAX_URL_LENGTH or not value.isprintable() or " " in value:
        raise InvalidRequest("webhook_url", problem)
    try:
        parts = urlsplit(value)
    except ValueError:
        raise InvalidRequest("webhook_url", problem) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest("webhook_url", problem)
    return value


def check_idempotency_key(value: str | None) -> str | None:
    """The ``Idempotency-Key`` header: 1 to 255 printable characters (or absent)."""
    if value is not None and not (0 < len(value) <= MAX_IDEMPOTENCY_KEY and value.isprintable()):
        raise InvalidRequest("Idempotency-Key", f"must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters")
    return value


def body_limit(max_upload_bytes: int) -> int:
    """The largest request body: the media limit in base64 (data URLs) plus 1 MiB of other fields."""
    return max_upload_bytes * 4 // 3 + (1 << 20)


def _counted(receive: Receive, limit: int) -> Receive:
    """`receive` that raises 413 once more than `limit` body bytes have arrived."""
    received = 0

    async def counted() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise ApiError(413, f"the request body exceeds the limit of {limit} bytes", kind="request_too_large")
        return message

    return counted


def limited(request: Request, limit: int) -> Request:
    """`request` whose body is refused with 413 when it says or turns out to be over `limit` bytes."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, f"a request body may have at most {limit} bytes, this one says {length}",
                       kind="request_too_large")
    return Request(request.scope, _counted(request.receive, limit))


class Submission:
    """A create/extend request split into generation parameters, media bytes and job options."""

    def __init__(self) -> None:
        self.fields: dict[str, list] = {}
        self.media: dict[str, bytes] = {}
        self.options: dict[str, object] = {}

    @classmethod
    async def read(cls, request: Request, max_upload_bytes: int) -> "Submission":
        """Read and split the body: JSON or multipart, counted while it arrives (chunked bodies too) and
        refused with 413 past `max_upload_bytes` of media (`body_limit` bytes of body)."""
        limit = body_limit(max_upload_bytes)
        request = limited(request, limit)
        sub = cls()
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            try:
                form = await request.form(max_part_size=limit)
            except (HTTPException, MultiPartException) as exc:  # Starlette's word on a malformed body
                raise ApiError(400, f"the multipart body is malformed: {getattr(exc, 'detail', exc)}") from None
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
            if not is_json(request.headers.get("content-type", "")):  # e.g. text/plain: what any web page can send
                raise ApiError(400, "the body must be JSON (Content-Type: application/json) or multipart/form-data")
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
                raise ApiError(400, "the body is neither JSON nor multipart/form-data") from None
            except RecursionError:
                raise ApiError(400, "the JSON body is nested too deeply") from None
            if not isinstance(body, dict):
                raise ApiError(400, "the JSON body must be an object")
            sub.fields = {k: [v] for k, v in body.items()}
        for name in JOB_OPTIONS:
            if name in sub.fields:
                sub.options[name] = sub.fields.pop(name)[-1]
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
            seconds = _number(data.pop("seconds"), "seconds")
            if not 0 < seconds <= 60:
                raise InvalidRequest("seconds", f"expected a duration from 0 to 60 seconds, got {seconds:g}")
            if "frames" not in data:
                fps = data.get("fps", 25)
                if not isinstance(fps, (int, str)) or not str(fps).isdigit() or not 1 <= int(fps) <= 60:
                    raise InvalidRequest("fps", "expected a whole number of frames per second from 1 to 60")
                data["frames"] = 4 * max(0, round(seconds * int(fps) / 4)) + 1
                if data["frames"] > MAX_FRAMES:
                    raise InvalidRequest("seconds", f"at {fps} fps a video may last {MAX_FRAMES / int(fps):.2f} s at most")
        reference = data.pop("input_reference", None)
        if reference is not None:
            data.setdefault("task", "i2v")
            data["images"] = [reference]
        if "images" in data:
            data["images"] = [self._media("images", v, i) for i, v in enumerate(data["images"])]
        if isinstance(data.get("video"), (bytes, str)) and not str(data.get("video", "")).startswith("video_"):
            data["video"] = self._media("video", data["video"])
        return data


def request_fingerprint(request: dict, media: dict[str, bytes], options: dict) -> str:
    """A hash of everything a job is made from (the validated request, its media, its options), to tell
    a repeated request from a different one under the same ``Idempotency-Key``."""
    digest = hashlib.sha256(json.dumps({"request": request, "options": options}, sort_keys=True, default=str).encode())
    for name in sorted(media):
        digest.update(name.encode() + b"\0" + hashlib.sha256(media[name]).digest())
    return digest.hexdigest()
