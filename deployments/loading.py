"""The service's loading state: what HTTP clients get until every deployment has a running replica.

`pusa-serve` holds the port with the same answers until Serve's proxy listens (`deployments.loading_port`),
and deploys the application as `LoadingRouter` alone before that proxy opens the port
(this module imports no torch and no model code, so its replica starts in a second or two), then the
real application in its place: the Router's rolling update starts the real replica before it stops this
one (``max_surge_percent``), so the route never goes missing nor is left without a running replica. The real Router answers the same way
until its `Readiness` has seen a running replica of every other deployment of its application (the
TextEncoder, VAE and DiT take minutes to load 14B-size weights on a GPU).

While loading: the API (``/v1/...``) answers 503 in OpenAI's error shape with ``code: "loading"`` and
``Retry-After``; ``/health`` 503 ``{"status": "loading"}``; the web page a short HTML page that reloads
itself. Nothing here waits on another deployment.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from .loading_port import loading_reply

logger = logging.getLogger("ray.serve")

# The Router's rolling updates start one replica over its count at a time (Serve rounds the surge up to
# a whole replica): an old replica stops only once a new one runs, for the price of one extra replica.
ROUTER_SURGE_PERCENT = 1


def loading_response(path: str, detail: str = "") -> Response:
    """The 503 for a request to `path` while the service loads (`deployments.loading_port.loading_reply`)."""
    reply = loading_reply(path, detail)
    return Response(reply.body, status_code=reply.status, headers=reply.headers)


def gated(path: str) -> bool:
    """Whether the real Router answers `path` with the loading state while it loads: the API, ``/health``
    and the web page (its scripts, styles and the OpenAPI schema are served as usual)."""
    return path in ("/", "/health", "/v1") or path.startswith("/v1/")


class LoadingGate:
    """ASGI middleware of the Router's FastAPI app: the loading state while `readiness` (set by the Router
    replica of this process) is not ready. A pure ASGI middleware, so that streams pass through as they are."""

    readiness: Readiness | None = None

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        readiness = LoadingGate.readiness
        if scope["type"] == "http" and readiness is not None and not readiness.ready and gated(scope["path"]):
            readiness.poke()
            await loading_response(scope["path"], readiness.detail())(scope, receive, send)
            return
        await self.app(scope, receive, send)


class Readiness:
    """Whether every other deployment of this replica's application has a running replica (or is scaled
    to zero on purpose), as Serve's controller reports it; checked in the background (every `period_s`
    until it holds), never while a request waits. Once ready it stays ready: a replica that fails later
    is Serve's to replace, and jobs wait in the queue meanwhile."""

    def __init__(self, period_s: float = 0.25) -> None:
        self.period_s = period_s
        self.started = time.monotonic()
        self._task: asyncio.Task | None = None
        try:  # a Router replica that starts beside running deployments (a restart, a scale-up) is ready at once
            self.waiting_for = self._not_running()
        except Exception:  # no controller to ask (outside Serve), or it is busy: the background check asks
            self.waiting_for = []
            self.ready = False
        else:
            self.ready = not self.waiting_for
        try:  # watch from now on (a Serve replica's constructor runs on its event loop), not from a first request
            self.poke()
        except RuntimeError:  # no event loop (outside Serve)
            pass

    def detail(self) -> str:
        if self.ready:
            return ""
        if not self.waiting_for:
            return "starting"
        return "waiting for " + ", ".join(self.waiting_for)

    def poke(self) -> None:
        """Start the background check if it is not running (on the replica's event loop)."""
        if not self.ready and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while not self.ready:
            try:
                self.waiting_for = await asyncio.to_thread(self._not_running)
            except Exception as exc:  # the controller busy or restarting: try again
                logger.warning("readiness check failed: %r", exc)
            else:
                if not self.waiting_for:
                    self.ready = True
                    logger.info("ready: every deployment has a running replica (%.1f s after the Router started)",
                                time.monotonic() - self.started)
                    return
            await asyncio.sleep(self.period_s)

    @staticmethod
    def _not_running() -> list[str]:
        """Deployments of this application (but this one) without a running replica, unless they are meant
        to have none (autoscaled to zero)."""
        context = serve.get_replica_context()
        app = serve.status().applications.get(context.app_name)
        if app is None:
            return [context.app_name]
        return sorted(name for name, dep in app.deployments.items()
                      if name != context.deployment and not dep.replica_states.get("RUNNING")
                      and dep.status.value != "HEALTHY")  # HEALTHY with none running: scaled to zero


@serve.deployment(name="Router", max_surge_percent=ROUTER_SURGE_PERCENT)
class LoadingRouter:
    """The application's first ingress: answers every request with the loading state, until the real
    Router replaces it in place."""

    async def __call__(self, request: Request) -> Response:
        return loading_response(request.url.path, "starting")


def build_app(args: dict | None = None) -> serve.Application:
    """The loading application (its ``args`` are the real application's, and unused)."""
    return LoadingRouter.bind()
