"""Who may make a job, and whether now: API keys, the exposure rule, cost limits, quotas and the queue.

Everything here runs before a request's media are decoded or stored, so a refused request costs the
service a few database reads.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Literal, TypeVar
from urllib.parse import urlsplit

from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from pusa_jobs.api_keys import Caller, KeyStore, Quotas
from pusa_jobs.cost import CostSettings, cost_drivers, estimate_gpu_seconds
from pusa_jobs.job_store import JobStore
from pusa_jobs.quotas import Charge, QuotaExceeded
from pusa_model.media import MediaLimits
from pusa_model.presets import Preset
from pusa_model.request import GenerationPlan
from pusa_model.request_schema import MAX_FRAMES

from .batch_files import BatchLimits
from .openai_api import ApiError

logger = logging.getLogger("ray.serve")
T = TypeVar("T")
bearer = HTTPBearer(auto_error=False, description="an API key from `pusa-admin keys create`")


class ApiSettings(BaseModel):
    """App arg ``api``: access, limits and timings of the HTTP API."""

    model_config = ConfigDict(extra="forbid")

    auth: Literal["keys", "none"] = "keys"  # "none" only while the HTTP proxy listens on loopback
    quotas: Quotas = Quotas()  # for keys without quotas of their own (and for everyone without keys)
    cost: CostSettings = CostSettings()
    media: MediaLimits = MediaLimits()
    max_upload_bytes: int = Field(default=64 << 20, ge=1)  # media of one request; its body may be 4/3 + 1 MiB
    max_frames: int = Field(default=401, ge=1, le=MAX_FRAMES)  # of a video; more than a window is a long video
    max_queued_jobs: int = Field(default=32, ge=1)  # jobs waiting for a runner, all routers together; more: 429
    retry_after_s: int = Field(default=30, ge=1)
    result_url_ttl_s: int = Field(default=900, ge=1, le=7 * 86400)  # presigned result URLs in a job object
    event_poll_s: float = 0.25  # how often an SSE stream reads new events
    keepalive_s: float = 15.0  # longest silence on an SSE stream
    stream_grace_s: float = 60.0  # a job made by /v1/videos/stream survives this long without a client
    batch: BatchLimits = BatchLimits()


def is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def check_exposure(auth: str, host: str | None) -> None:
    """`ValueError` for a service without keys on an address other hosts can reach."""
    if auth == "none" and not is_loopback(host):
        raise ValueError(f"api.auth is 'none' but the HTTP proxy listens on {host}: turn keys on (api.auth: keys) "
                         f"or listen on 127.0.0.1")


def proxy_host() -> str | None:
    """The address Serve's HTTP proxies listen on, as the controller has it (None when unknown)."""
    try:
        client = serve.context._get_global_client(raise_if_no_controller_running=False)
        return None if client is None else client.http_config.host
    except Exception as exc:  # an older or newer Serve without this client: the launcher's check remains
        logger.warning("could not read the HTTP proxy's address: %r", exc)
        return None


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, kind="invalid_request_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


class Admission:
    """Decides, before any work, whether a request may make a job: its caller, its cost, the caller's
    quotas and the queue's room."""

    def __init__(self, settings: ApiSettings, jobs: JobStore, keys: KeyStore, preset: Preset) -> None:
        self.settings = settings
        self.jobs = jobs
        self.keys = keys
        self.preset = preset
        self.anonymous = Caller(key_id="", role="admin", quotas=settings.quotas)

    async def caller(self, credentials: HTTPAuthorizationCredentials | None) -> Caller:
        """The request's key, or 401 in OpenAI's shape (always the anonymous admin without keys)."""
        if self.settings.auth == "none":
            return self.anonymous
        if credentials is None:
            raise _unauthorized("no API key: send it as 'Authorization: Bearer <key>'")
        key = await asyncio.to_thread(self.keys.authenticate, credentials.credentials)
        if key is None:
            raise _unauthorized("the API key is not valid or was revoked")
        return Caller(key_id=key.id, role=key.role, quotas=key.quotas.over(self.settings.quotas))

    def price(self, plan: GenerationPlan, preset: Preset | None = None) -> float:
        """The request's estimated GPU-seconds; 400 naming what makes it too large when it exceeds the
        deployment's maximum (of cost, or of frames), against the defaults of `preset` (the model's; None:
        the deployment's)."""
        if plan.frames > self.settings.max_frames:
            raise ApiError(400, f"frames: {plan.frames} frames; this deployment makes videos of at most "
                                f"{self.settings.max_frames}", param="frames")
        cost = estimate_gpu_seconds(plan, self.settings.cost.table)
        limit = self.settings.cost.max_gpu_seconds
        if limit is not None and cost > limit:
            drivers = cost_drivers(plan, preset or self.preset)
            raise ApiError(400, f"{', '.join(drivers)}: this request would take about {cost:.0f} GPU-seconds; the "
                                f"limit is {limit:g} (reduce {' or '.join(drivers)})", param=drivers[0])
        return cost

    async def admit(self, caller: Caller, cost: float) -> Charge:
        """The charge for a job of `cost`, after the caller's quotas and the queue were found to have room
        (429 with ``Retry-After`` when not; 400 when the job could never fit the daily quota)."""
        day = caller.quotas.gpu_seconds_per_day
        if day is not None and cost > day:
            raise ApiError(400, f"this request would take about {cost:.0f} GPU-seconds, more than this key's "
                                f"daily quota of {day:g}", param="size")
        charge = Charge(owner=caller.owner, gpu_seconds=cost, quotas=caller.quotas, at=time.time(),
                        busy_retry_s=self.settings.retry_after_s)
        try:
            await asyncio.to_thread(self.jobs.check_quotas, charge)
        except QuotaExceeded as exc:
            raise quota_error(exc) from None
        queued = await asyncio.to_thread(self.jobs.queued_count)
        if queued >= self.settings.max_queued_jobs:
            raise ApiError(429, "the queue is full; retry later", kind="rate_limit_exceeded",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        return charge


async def owned(load: Callable[[str], T], object_id: str, caller: Caller, created_at_of: Callable[[str], float],
                what: str) -> T:
    """`load(object_id)` when it exists for `caller`; else 404, the same for another key's object as for
    a missing one. A string that is no id of its kind (`created_at_of` raises) costs no database read."""
    try:
        created_at_of(object_id)
        found = await asyncio.to_thread(load, object_id)
    except (ValueError, KeyError):
        found = None
    if found is None or not caller.may_see(found.owner):
        raise ApiError(404, f"no {what} with id {object_id!r}", param=f"{what}_id", kind="not_found")
    return found


def quota_error(exc: QuotaExceeded) -> ApiError:
    """429 for a quota, naming it, with ``Retry-After``."""
    return ApiError(429, f"quota {exc.quota} exceeded: {exc}", param=exc.quota, kind="rate_limit_exceeded",
                    code="quota_exceeded", headers={"Retry-After": str(exc.retry_after_s)})


UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class CrossSiteGate:
    """ASGI middleware of the Router's app: without API keys (``api.auth: none``), a request that changes
    something and comes from a page of another origin (its ``Origin`` names another host than its ``Host``)
    is refused with 403, so a web page the user has open cannot create, cancel or delete jobs through the
    browser. With keys, a bearer key is never sent by a browser on its own, so nothing is refused here.
    `enabled` is set by the Router replica of this process."""

    enabled = False

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if CrossSiteGate.enabled and scope["type"] == "http" and scope["method"] in UNSAFE_METHODS:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            origin = headers.get("origin")
            if origin is not None and urlsplit(origin).netloc.lower() != headers.get("host", "").lower():
                error = ApiError(403, f"a request from the page at {origin} was refused: without API keys this "
                                      "service takes changes only from its own page and from clients that send "
                                      "no Origin", kind="permission_error")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
