"""OpenAI's Files and Batch APIs on the Router: upload a JSONL of video requests, run it as a batch on the
cluster's batch pools (a runner drives `pusa batch`'s Ray Data pipeline, not the online queue), read the
output and error files. Files and batches belong to the key that made them, like videos.

`BatchRoutes` is a mixin of the Router (Serve routes the methods of its bases); `batch_routes` holds
their routes for the Router's app to include.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Literal

from fastapi import APIRouter, Request, Security
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from pusa_batch.rows import batch_model, read_row
from pusa_jobs.api_keys import Caller, Quotas
from pusa_jobs.batches import (BATCH_PREFIX, FILE_PREFIX, Batch, BatchStore, StoredFile, batch_created_at,
                               file_created_at)
from pusa_jobs.job_files import JobFiles
from pusa_jobs.job_store import JobStore
from pusa_jobs.jobs import new_id
from pusa_jobs.quotas import Charge, QuotaExceeded
from pusa_model.errors import InvalidRequest
from pusa_model.loras import LoraRegistry
from pusa_model.presets import Preset

from .admission import Admission, ApiSettings, bearer, owned, quota_error
from .api_schema import (BatchCreate, BatchList, BatchObject, FileDeleted, FileList, FileObject, FileUpload,
                         responses)
from .batch_files import read_requests
from .batch_run import manifest_key
from .openai_api import ApiError, limited

batch_routes = APIRouter()
COMPLETION_WINDOW_S = {"24h": 86400.0}
FILE_UPLOAD = {"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": FileUpload.model_json_schema()}}}}


def _page(items: list, limit: int) -> dict:
    data = [item.to_openai() for item in items[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(items) > limit}


def _check_page(limit: int, order: str) -> None:
    if not 1 <= limit <= 100:
        raise ApiError(400, "limit: must be between 1 and 100", param="limit")
    if order not in ("asc", "desc"):
        raise ApiError(400, "order: must be asc or desc", param="order")


class BatchRoutes:
    """The Router's `/v1/files` and `/v1/batches` routes (it provides the attributes below)."""

    settings: ApiSettings
    admission: Admission
    batches: BatchStore
    files: JobFiles
    jobs: JobStore  # its retention_s is the files' too
    presets: dict[str, Preset]  # the models served, name -> preset
    registries: dict[str, LoraRegistry]  # each model's LoRA registry

    async def _file(self, file_id: str, caller: Caller) -> StoredFile:
        return await owned(self.batches.get_file, file_id, caller, file_created_at, "file")

    async def _batch(self, batch_id: str, caller: Caller) -> Batch:
        return await owned(self.batches.get, batch_id, caller, batch_created_at, "batch")

    # -- files -----------------------------------------------------------------------------------

    @batch_routes.post("/v1/files", response_model=None, responses=responses(FileObject, 400, 413, 503),
                       openapi_extra=FILE_UPLOAD)
    async def upload_file(self, request: Request,
                          credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> dict:
        """Upload a batch input file (multipart: ``file`` and ``purpose=batch``); every line is checked."""
        caller = await self.admission.caller(credentials)
        limits = self.settings.batch
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(400, "expected multipart/form-data with file and purpose", param="file")
        try:
            form = await limited(request, limits.max_file_bytes + (1 << 20)).form(max_part_size=limits.max_file_bytes)
        except (HTTPException, MultiPartException) as exc:
            raise ApiError(400, f"the multipart body is malformed: {getattr(exc, 'detail', exc)}") from None
        if form.get("purpose") != "batch":
            raise ApiError(400, "purpose: must be batch", param="purpose")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "file: expected a file upload", param="file")
        data = await upload.read()
        try:
            await asyncio.to_thread(read_requests, data, limits.max_requests)
        except InvalidRequest as exc:
            raise ApiError.invalid(exc) from None
        file_id = new_id(FILE_PREFIX)
        created_at = file_created_at(file_id)  # kept for the deployment's retention (a batch keeps its own copy)
        stored = StoredFile(id=file_id, owner=caller.owner, purpose="batch", filename=(upload.filename or "input.jsonl")[:255],
                            bytes=len(data), created_at=created_at, key=f"files/{file_id}",
                            expires_at=created_at + self.jobs.retention_s)
        await asyncio.to_thread(self.files.store.put, stored.key, data, "application/jsonl")
        await asyncio.to_thread(self.batches.add_file, stored)
        return stored.to_openai()

    @batch_routes.get("/v1/files", response_model=None, responses=responses(FileList, 400, 503))
    async def list_files(self, limit: int = 20, after: str | None = None, order: Literal["asc", "desc"] = "desc",
                         purpose: Literal["batch", "batch_output"] | None = None,
                         credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> dict:
        caller = await self.admission.caller(credentials)
        _check_page(limit, order)
        owner = None if caller.is_admin else caller.owner
        try:
            page = await asyncio.to_thread(self.batches.list_files, limit + 1, after, order, owner, purpose)
        except KeyError:
            raise ApiError(400, "after: must be the id of a file", param="after") from None
        return _page(page, limit)

    @batch_routes.get("/v1/files/{file_id}", response_model=None, responses=responses(FileObject, 404, 503))
    async def retrieve_file(self, file_id: str,
                            credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> dict:
        caller = await self.admission.caller(credentials)
        return (await self._file(file_id, caller)).to_openai()

    @batch_routes.get("/v1/files/{file_id}/content", response_class=Response, responses=responses(
        None, 404, 503, media={"application/jsonl": {"schema": {"type": "string"}}}))
    async def file_content(self, file_id: str,
                           credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> Response:
        caller = await self.admission.caller(credentials)
        stored = await self._file(file_id, caller)
        return Response(await asyncio.to_thread(self.files.store.get, stored.key), media_type="application/jsonl")

    @batch_routes.delete("/v1/files/{file_id}", response_model=None, responses=responses(FileDeleted, 404, 503))
    async def delete_file(self, file_id: str,
                          credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> dict:
        """Delete a file (a batch that already started keeps its own copy of the requests)."""
        caller = await self.admission.caller(credentials)
        stored = await self._file(file_id, caller)
        await asyncio.to_thread(self.batches.delete_file, file_id)
        await asyncio.to_thread(self.files.store.delete, stored.key)
        return {"id": file_id, "object": "file", "deleted": True}

    # -- batches ---------------------------------------------------------------------------------

    def _batch_model(self, rows: list[dict]) -> str:
        """The model the rows name (`pusa_batch.rows.batch_model`: one per batch, pusa-v1 when none names
        one); 400 naming ``model`` when they name two, or one this deployment does not serve."""
        try:
            model = batch_model(rows)
        except InvalidRequest as exc:
            raise ApiError(400, str(exc), param="model") from None
        if model not in self.presets:
            raise ApiError(400, f"model: model {model!r} is not served by this deployment "
                                f"(served: {', '.join(self.presets)})", param="model")
        return model

    def _price(self, rows: list[dict], model: str) -> float:
        """The GPU-seconds of the rows that plan on `model`; 400 naming the row of one above the per-request
        limit. Rows that do not plan cost nothing: they fail at once, into the error file."""
        total, preset = 0.0, self.presets[model]
        loras = self.registries[model]
        for row in rows:
            fields = {k: v for k, v in row.items() if k != "custom_id"}
            try:
                plan, _ = read_row(fields, preset, base=None, loras=loras)
            except InvalidRequest:
                continue
            try:
                total += self.admission.price(plan, preset)
            except ApiError as exc:
                raise ApiError(400, f"input_file_id: request {row['custom_id']!r}: {exc.message}",
                               param="input_file_id") from None
        return total

    @batch_routes.post("/v1/batches", response_model=None, responses=responses(BatchObject, 400, 404, 429, 503))
    async def create_batch(self, body: BatchCreate,
                           credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> dict:
        """Run an uploaded file's requests as a batch on the cluster's batch pools, on the one model its rows
        name (pusa-v1 when none names one)."""
        caller = await self.admission.caller(credentials)
        limits = self.settings.batch
        if await asyncio.to_thread(self.batches.unfinished_count, caller.owner) >= limits.max_unfinished_per_key:
            raise ApiError(429, f"this key has {limits.max_unfinished_per_key} batches not yet ended; retry when one "
                                f"ends", kind="rate_limit_exceeded", headers={"Retry-After": str(self.settings.retry_after_s)})
        try:
            stored = await self._file(body.input_file_id, caller)
        except ApiError:
            raise ApiError(404, f"no file with id {body.input_file_id!r}", param="input_file_id",
                           kind="not_found") from None
        if stored.purpose != "batch":
            raise ApiError(400, "input_file_id: not a file uploaded with purpose batch", param="input_file_id")
        data = await asyncio.to_thread(self.files.store.get, stored.key)
        rows = await asyncio.to_thread(read_requests, data, limits.max_requests)
        cost = await asyncio.to_thread(self._price, rows, self._batch_model(rows))
        day = caller.quotas.gpu_seconds_per_day
        if day is not None and cost > day:
            raise ApiError(400, f"input_file_id: this batch would take about {cost:.0f} GPU-seconds, more than this "
                                f"key's daily quota of {day:g}", param="input_file_id")
        now = time.time()
        batch = Batch(id=new_id(BATCH_PREFIX, now), owner=caller.owner, endpoint=body.endpoint,
                      input_file_id=stored.id, completion_window=body.completion_window, status="validating",
                      metadata=body.metadata, cost_gpu_s=round(cost, 3), total=len(rows), created_at=now,
                      expires_at=now + COMPLETION_WINDOW_S[body.completion_window])
        manifest = "".join(json.dumps(row) + "\n" for row in rows).encode()
        await asyncio.to_thread(self.files.store.put, manifest_key(batch.id), manifest, "application/jsonl")
        charge = Charge(owner=caller.owner, gpu_seconds=cost, quotas=Quotas(gpu_seconds_per_day=day), at=now,
                        busy_retry_s=self.settings.retry_after_s)
        try:
            await asyncio.to_thread(self.batches.create, batch, charge)
        except QuotaExceeded as exc:
            await asyncio.to_thread(self.files.store.delete_prefix, f"batches/{batch.id}/")
            raise quota_error(exc) from None
        self._wake_a_runner(batch=True)
        return batch.to_openai()

    @batch_routes.get("/v1/batches", response_model=None, responses=responses(BatchList, 400, 503))
    async def list_batches(self, limit: int = 20, after: str | None = None,
                           credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> dict:
        """The caller's batches, newest first."""
        caller = await self.admission.caller(credentials)
        _check_page(limit, "desc")
        owner = None if caller.is_admin else caller.owner
        try:
            page = await asyncio.to_thread(self.batches.list, limit + 1, after, "desc", owner)
        except KeyError:
            raise ApiError(400, "after: must be the id of a batch", param="after") from None
        return _page(page, limit)

    @batch_routes.get("/v1/batches/{batch_id}", response_model=None, responses=responses(BatchObject, 404, 503))
    async def retrieve_batch(self, batch_id: str,
                             credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> dict:
        caller = await self.admission.caller(credentials)
        return (await self._batch(batch_id, caller)).to_openai()

    @batch_routes.post("/v1/batches/{batch_id}/cancel", response_model=None,
                       responses=responses(BatchObject, 404, 503))
    async def cancel_batch(self, batch_id: str,
                           credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> dict:
        """Cancel a batch: ``cancelling`` until its pipeline's next row ends (the rows then in flight are
        dropped), then ``cancelled`` with the finished rows in its output file (a no-op once it ended)."""
        caller = await self.admission.caller(credentials)
        await self._batch(batch_id, caller)
        await asyncio.to_thread(self.batches.request_cancel, batch_id)
        return (await self._batch(batch_id, caller)).to_openai()
