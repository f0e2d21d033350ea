"""OpenAI's batch file formats for ``/v1/videos``: the input file's request lines, and the lines of a
batch's output and error files.

An input line is ``{"custom_id", "method": "POST", "url": "/v1/videos", "body": {...}}`` with the body
``POST /v1/videos`` takes as JSON; its media are data URLs (a batch reads no path or bucket of the
service's). It becomes a `pusa batch` manifest row: the body with its ``custom_id``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pusa_batch.outputs import CUSTOM_ID
from pusa_batch.rows import MEDIA_FIELDS
from pusa_batch.sources import media_bytes
from pusa_model.errors import InvalidRequest

ENDPOINT = "/v1/videos"


class BatchLimits(BaseModel):
    """App arg ``api.batch``: what one key may submit as batches."""

    model_config = ConfigDict(extra="forbid")

    max_file_bytes: int = Field(default=200 << 20, ge=1)  # an uploaded input file
    max_requests: int = Field(default=10_000, ge=1)  # requests of one batch
    max_unfinished_per_key: int = Field(default=4, ge=1)  # batches not yet ended; more: 429


def _line_error(number: int, message: str) -> InvalidRequest:
    return InvalidRequest("file", f"line {number}: {message}")


def _check_media(body: dict, number: int) -> None:
    for name in MEDIA_FIELDS:
        values = body.get(name)
        for index, value in enumerate(values if isinstance(values, list) else [values]):
            if value is None:
                continue
            field = f"{name}[{index}]" if name == "images" else name
            try:
                media_bytes(value, field, base=None)
            except InvalidRequest as exc:
                raise _line_error(number, f"body.{exc}") from None


def read_requests(data: bytes, max_requests: int) -> list[dict]:
    """The manifest rows of an input file, in order; `InvalidRequest` naming ``file`` and the line for
    a line that is not a request of this shape, a repeated ``custom_id``, or too many lines."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("file", "expected UTF-8 JSON lines") from None
    rows: list[dict] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _line_error(number, f"not JSON ({exc.msg})") from None
        if not isinstance(request, dict):
            raise _line_error(number, "expected a JSON object")
        custom_id = request.get("custom_id")
        if not isinstance(custom_id, str) or not CUSTOM_ID.match(custom_id):
            raise _line_error(number, "custom_id: expected 1 to 128 letters, digits, '.', '_' or '-', starting "
                                      "with a letter or digit")
        if custom_id in seen:
            raise _line_error(number, f"custom_id {custom_id!r} repeats line {seen[custom_id]}")
        seen[custom_id] = number
        if request.get("method") != "POST":
            raise _line_error(number, "method: must be POST")
        if request.get("url") != ENDPOINT:
            raise _line_error(number, f"url: must be {ENDPOINT}")
        body = request.get("body")
        if not isinstance(body, dict):
            raise _line_error(number, "body: expected a JSON object")
        _check_media(body, number)
        if len(rows) == max_requests:
            raise InvalidRequest("file", f"a batch may have at most {max_requests} requests")
        rows.append({**body, "custom_id": custom_id})
    if not rows:
        raise InvalidRequest("file", "the file has no requests")
    return rows


def _request_line_id(batch_id: str, custom_id: str) -> str:
    return "batch_req_" + hashlib.sha256(f"{batch_id}/{custom_id}".encode()).hexdigest()[:24]


def output_line(batch_id: str, custom_id: str, video: dict[str, Any]) -> dict:
    """A completed request's line: its `Video` object as the response body."""
    return {"id": _request_line_id(batch_id, custom_id), "custom_id": custom_id, "error": None,
            "response": {"status_code": 200, "request_id": video["id"], "body": video}}


def error_line(batch_id: str, custom_id: str, record: dict | None, ended: str) -> dict:
    """A request's line in the error file: its 400 (the field and the reason) when it failed, else the
    batch's end (``batch_cancelled``, ``batch_expired``) that left it undone."""
    if record is not None:
        error = {"message": record["error"]["message"], "type": "invalid_request_error",
                 "param": record["error"]["param"], "code": None}
        return {"id": _request_line_id(batch_id, custom_id), "custom_id": custom_id, "error": None,
                "response": {"status_code": 400, "request_id": None, "body": {"error": error}}}
    return {"id": _request_line_id(batch_id, custom_id), "custom_id": custom_id, "response": None,
            "error": {"code": f"batch_{ended}", "message": f"the batch was {ended} before this request ran"}}


def deleted_line(batch_id: str, custom_id: str) -> dict:
    """The error-file line of a request whose video was made, then deleted before the batch ended (by its
    owner, or at the end of its retention): it is not made again."""
    return {"id": _request_line_id(batch_id, custom_id), "custom_id": custom_id, "response": None,
            "error": {"code": "video_deleted",
                      "message": "this request's video was made, then deleted before the batch ended"}}
