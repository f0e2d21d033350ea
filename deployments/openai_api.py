"""The OpenAI video API's HTTP side: reading a request body (JSON, or multipart with uploads and the
SDK's ``name[key]`` object fields) within its size limit, the headers and options checked at the door,
and errors in OpenAI's shape.

`read_submission` reads a create or extend request off the wire into a `pusa_jobs.submission.Submission`
(its fields, its media bytes, and the job options that are not generation parameters), which maps
OpenAI's fields (data URLs, ``size``, ``seconds``) onto Pusa's.
"""

from __future__ import annotations

import hashlib
import json
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.types import Message, Receive

from pusa_jobs.submission import JOB_OPTIONS, Submission
from pusa_model.errors import InvalidRequest

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


async def read_submission(request: Request, max_upload_bytes: int) -> Submission:
    """Read and split the body: JSON or multipart, counted while it arrives (chunked bodies too) and
    refused with 413 past `max_upload_bytes` of media (`body_limit` bytes of body)."""
    limit = body_limit(max_upload_bytes)
    request = limited(request, limit)
    sub = Submission()
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


def request_fingerprint(request: dict, media: dict[str, bytes], options: dict) -> str:
    """A hash of everything a job is made from (the validated request, its media, its options), to tell
    a repeated request from a different one under the same ``Idempotency-Key``."""
    digest = hashlib.sha256(json.dumps({"request": request, "options": options}, sort_keys=True, default=str).encode())
    for name in sorted(media):
        digest.update(name.encode() + b"\0" + hashlib.sha256(media[name]).digest())
    return digest.hexdigest()
