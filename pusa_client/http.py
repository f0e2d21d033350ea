"""The service's `/v1/videos` API as Python calls over httpx, and its errors: `ApiError` for a refusal in
OpenAI's error shape, `Unreachable` when no answer came (refused, timed out or dropped connection)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

TIMEOUT = httpx.Timeout(300, connect=10)  # uploads and downloads of up to the API's 64 MiB
STREAM_TIMEOUT = httpx.Timeout(10, read=60)  # the service sends an event or a keep-alive every 15 s
Upload = tuple[str, tuple[str, bytes, str]]  # (field, (file name, content, media type))


class ApiError(Exception):
    """The API answered with an error: its HTTP status, the field it names (`param`) and its message."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def __str__(self) -> str:
        if self.param and not self.message.startswith(f"{self.param}:"):
            return f"{self.param}: {self.message}"
        return self.message

    @classmethod
    def of(cls, response: httpx.Response) -> "ApiError":
        try:
            error = response.json()["error"]
            return cls(response.status_code, str(error["message"]), error.get("param"))
        except (ValueError, KeyError, TypeError):
            return cls(response.status_code, f"HTTP {response.status_code}: {response.text[:200]}")


class Unreachable(Exception):
    """No answer from the service."""


def parse_sse(lines: Iterable[str]) -> Iterator[dict]:
    """Server-Sent Events as ``{"event", "id", "data"}`` (``id`` None when the event has none, ``data``
    decoded from JSON); comments (keep-alives) are skipped."""
    event: dict = {"event": "message", "id": None}
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield {**event, "data": json.loads("\n".join(data))}
            event, data = {"event": "message", "id": None}, []
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name in ("event", "id"):
            event[name] = value


def form_value(value: object) -> str:
    """A field as a multipart form value: lists of numbers comma-separated, the way the API reads them;
    lists of objects (``loras``) as JSON."""
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        return json.dumps(value)
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


class Api:
    """One service (`url`), called with one API key (sent as a bearer token) or none."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=TIMEOUT)

    def __enter__(self) -> "Api":
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    @contextmanager
    def _stream(self, method: str, path: str, **kwargs) -> Iterator[httpx.Response]:
        """A response whose body is read by the caller; an error status raises `ApiError` first."""
        try:
            with self.http.stream(method, path, **kwargs) as response:
                if response.is_error:
                    response.read()
                    raise ApiError.of(response)
                yield response
        except httpx.TransportError as exc:
            raise Unreachable(f"{self.http.base_url}: {exc or type(exc).__name__}") from None

    def _json(self, method: str, path: str, **kwargs) -> dict:
        with self._stream(method, path, **kwargs) as response:
            response.read()
            return response.json()

    def create(self, fields: dict, uploads: list[Upload], idempotency_key: str | None = None,
               path: str = "/v1/videos") -> dict:
        """Queue a job: JSON, or multipart when there are files to upload. Returns the job object."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        if uploads:
            body = {"data": {k: form_value(v) for k, v in fields.items()}, "files": uploads}
        else:
            body = {"json": fields}
        return self._json("POST", path, headers=headers, **body)

    def extend(self, video_id: str, fields: dict, idempotency_key: str | None = None) -> dict:
        """Queue an extension of a completed job's video."""
        return self.create({**fields, "video": {"id": video_id}}, [], idempotency_key, "/v1/videos/extensions")

    def get(self, video_id: str) -> dict:
        return self._json("GET", f"/v1/videos/{video_id}")

    def list(self, limit: int, after: str | None = None) -> dict:
        """One page of the caller's jobs, newest first."""
        params = {"limit": limit} if after is None else {"limit": limit, "after": after}
        return self._json("GET", "/v1/videos", params=params)

    def cancel(self, video_id: str) -> dict:
        return self._json("POST", f"/v1/videos/{video_id}/cancel")

    def delete(self, video_id: str) -> dict:
        return self._json("DELETE", f"/v1/videos/{video_id}")

    def download(self, video_id: str, variant: str, path: Path, segment: int | None = None) -> None:
        """Write a completed job's video or thumbnail (or a finished window of a long video) to `path`."""
        params = {"variant": variant} if segment is None else {"variant": variant, "segment": segment}
        with self._stream("GET", f"/v1/videos/{video_id}/content", params=params) as response:
            with path.open("wb") as f:
                for chunk in response.iter_bytes():
                    f.write(chunk)

    def events(self, video_id: str, last_event_id: str | None = None) -> Iterator[dict]:
        """The job's events (SSE) after `last_event_id`, or all of them, until its final one."""
        headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
        with self._stream("GET", f"/v1/videos/{video_id}/events", headers=headers, timeout=STREAM_TIMEOUT) as response:
            yield from parse_sse(response.iter_lines())
