"""Deploy a Serve config and wait until it runs — or say what cannot start (`pusa-serve`'s work, and the tests').

Ray waits forever for a replica whose resources no node has. `deploy` checks every deployment's replica demand
against the cluster's nodes at once and gives up after its timeout with the deployments that are not running
and why, instead of hanging.
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import ray
from ray import serve
from ray.serve._private import api as serve_api
from ray.serve._private.build_app import BuiltApplication
from ray.serve._private.build_app import build_app as build_serve_app
from ray.serve._private.client import ServeControllerClient
from ray.serve.config import ProxyLocation, gRPCOptions
from ray.serve.schema import ServeDeploySchema

from pusa_model.presets import get_preset
from pusa_model.readahead import checkpoint_order

from .loading import LoadingRouter
from .loading_port import reachable_host


def replica_demand(options: dict) -> dict[str, float]:
    """Resources one replica asks for, from a deployment's ``ray_actor_options``."""
    demand = {"CPU": options.get("num_cpus", 1), "GPU": options.get("num_gpus", 0)}
    demand.update(options.get("resources") or {})
    return {k: float(v) for k, v in demand.items() if v}


def actor_options(dep) -> dict:
    """A config deployment's ``ray_actor_options`` as a dict ({} when the config leaves them out).

    Serve's schema parses them into a `RayActorOptionsSchema` model, not a dict."""
    options = dep.ray_actor_options
    if hasattr(options, "model_dump"):
        return options.model_dump(exclude_none=True)
    return options if isinstance(options, dict) else {}


def placement_bundles(dep) -> list[dict[str, float]] | None:
    """A config deployment's ``placement_group_bundles`` (None when it has none)."""
    if "placement_group_bundles" not in dep.model_fields_set or not dep.placement_group_bundles:
        return None
    return [{k: float(v) for k, v in b.items() if v} for b in dep.placement_group_bundles]


def node_demands(dep) -> list[dict[str, float]]:
    """What must fit on a single node for one replica of `dep`, one dict per node it needs.

    A replica with a placement group lives in its first bundle (its own ``ray_actor_options`` are part
    of it); with ``STRICT_PACK`` (the multi-GPU DiT) all bundles go on one node, so that node needs
    their sum; with another strategy each bundle needs some node.
    """
    bundles = placement_bundles(dep)
    if bundles is None:
        return [replica_demand(actor_options(dep))]
    if dep.placement_group_strategy == "STRICT_PACK":
        total: dict[str, float] = {}
        for bundle in bundles:
            for k, v in bundle.items():
                total[k] = total.get(k, 0.0) + v
        return [total]
    return bundles


def unplaceable(config: ServeDeploySchema, nodes: list[dict]) -> list[str]:
    """Deployments whose replica fits on none of `nodes` (each node: its total resources)."""
    problems = []
    for app in config.applications:
        for dep in app.deployments:
            for demand in node_demands(dep):
                if not any(all(node.get(r, 0) >= n for r, n in demand.items()) for node in nodes):
                    packed = placement_bundles(dep) and dep.placement_group_strategy == "STRICT_PACK"
                    where = " on one node (STRICT_PACK placement group)" if packed else ""
                    problems.append(f"{app.name}/{dep.name} needs {demand}{where} per replica; no node has that")
    return problems


def not_running(app_name: str) -> list[str]:
    """Deployments of `app_name` that are not healthy yet, with Serve's message."""
    status = serve.status().applications.get(app_name)
    if status is None:
        return [f"{app_name}: not deployed yet"]
    problems = [
        f"{app_name}/{name}: {dep.status.value} {dep.message}".strip()
        for name, dep in status.deployments.items()
        if dep.status.value != "HEALTHY"
    ]
    if status.status.value != "RUNNING" and not problems:  # e.g. still importing/building the app
        problems.append(f"{app_name}: {status.status.value} {status.message}".strip())
    return problems


APP_IMPORT_PATH = "deployments.app:build_app"


def loading_apps(config: ServeDeploySchema, deployed: set[str]) -> list[BuiltApplication]:
    """Each of this project's applications in `config` (`deployments.app:build_app`, or one whose config
    sets options of a Router deployment) that is not deployed yet, as the loading Router
    alone (same name, route, logging and Router options), built here rather than in the controller's
    import task, so that its route exists as soon as it is deployed. A running application is left
    alone: a redeploy must not put it back into loading."""
    built = []
    # the driver's runtime_env, as Serve gives an application by default (asking for it starts a Ray when none is up)
    driver_env = ray.get_runtime_context().runtime_env if ray.is_initialized() else {}
    for app in config.applications:
        router = next((d for d in app.deployments if d.name == "Router"), None)
        if (app.import_path != APP_IMPORT_PATH and router is None) or app.name in deployed:
            continue
        options = router.model_dump(exclude_unset=True, exclude={"name"}) if router else {}
        logging_config = app.logging_config.model_dump() if app.logging_config else None
        built.append(build_serve_app(LoadingRouter.options(**options).bind(), name=app.name,
                                     route_prefix=app.route_prefix, logging_config=logging_config,
                                     default_runtime_env={**driver_env, **(app.runtime_env or {})}))
    return built


def start_serve(config: ServeDeploySchema) -> tuple[ServeControllerClient, list[ray.ObjectRef]]:
    """Serve's controller (a running one, or a new one with the config's proxies): its client, and what to
    wait on for the new proxies' ports to be open.

    `serve.start` only returns once the proxies listen, so a route deployed after it is missing for a
    moment (a 404); this creates the controller as it does, but leaves the wait to the caller, who
    deploys first (Serve's private helpers, ray 2.60)."""
    client = serve_api._get_global_client(raise_if_no_controller_running=False)
    if client is not None:
        return client, []
    controller, proxies_ready = serve_api._create_controller_and_proxy_refs(
        config.http_options.model_dump(), gRPCOptions(**config.grpc_options.model_dump()), None, None,
        serve_api._coerce_controller_options(None), config.proxy_location)
    client = ServeControllerClient(controller)
    serve_api._set_global_client(client)
    return client, proxies_ready


def deploy(config: ServeDeploySchema, start_timeout_s: float,
           on_proxies_up: Callable[[], None] | None = None) -> list[str]:
    """Deploy `config` and wait; returns the problems if it is not running within the timeout.

    Applications not deployed yet first run the loading Router (`deployments.loading`), deployed before
    the proxies open their ports, so that from then on they answer 503 "loading" rather than 404 or
    nothing. `on_proxies_up` is called once the proxies listen (`pusa-serve` hands its port over then)."""
    client, proxies_ready = start_serve(config)
    loading = loading_apps(config, set(serve.status().applications))
    if loading:
        client.deploy_applications(loading, wait_for_ingress_deployment_creation=False,
                                   wait_for_applications_running=False)
    ray.get(proxies_ready, timeout=start_timeout_s)
    if on_proxies_up is not None:
        on_proxies_up()
    # At once: the controller's build task imports the model code for seconds, by which time the loading
    # Router's replica (no such imports) runs; the real Router then replaces it with a surge.
    client.deploy_apps(config, _blocking=False)
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    for line in unplaceable(config, nodes):
        print(f"pusa-serve: waiting for the autoscaler: {line}", file=sys.stderr)
    deadline = time.monotonic() + start_timeout_s
    while True:
        problems = [p for app in config.applications for p in not_running(app.name)]
        if not problems:
            problems = still_loading(config)
        if not problems:
            return problems
        if time.monotonic() > deadline:
            nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
            return problems + unplaceable(config, nodes)
        time.sleep(0.5)


def still_loading(config: ServeDeploySchema) -> list[str]:
    """This project's applications whose ``/health``, through the proxy on this machine, still says
    loading (the Router checks that every deployment runs a moment after Serve says so). A proxy this
    machine cannot reach (pusa-serve run off the cluster) is not waited for."""
    http = config.http_options
    if config.proxy_location == ProxyLocation.Disabled:
        return []
    host = reachable_host(http.host)
    host = f"[{host}]" if ":" in host else host
    problems = []
    for app in config.applications:
        if app.import_path != APP_IMPORT_PATH and not any(d.name == "Router" for d in app.deployments):
            continue
        url = f"http://{host}:{http.port}{(app.route_prefix or '').rstrip('/')}/health"
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=2):  # no HTTP_PROXY
                pass
        except urllib.error.HTTPError as exc:
            problems.append(f"{app.name}: {url} answers {exc.code} {exc.read()[:200].decode(errors='replace')}")
        except (OSError, urllib.error.URLError):
            pass
    return problems


def checkpoint_paths(config: ServeDeploySchema) -> list[Path]:
    """The local checkpoint folder of each model of the config's applications (with its local LoRA files), in
    the order the replicas wait on them (`pusa_model.readahead.checkpoint_order`)."""
    paths: list[Path] = []
    for app in config.applications:
        if app.import_path != APP_IMPORT_PATH:
            continue
        args = app.args or {}
        models = [(args.get("preset", "tiny"), args.get("loras")), (args.get("wan22_preset"), args.get("wan22_loras"))]
        for preset, registry in models:
            try:
                source = get_preset(preset).source if preset else ""
            except ValueError:
                continue  # the build reports a bad preset
            folder = Path(source).expanduser()
            if source and not source.startswith("s3://") and folder.is_dir():
                loras = [entry[key] for entry in (registry or {}).values() for key in ("path", "path_2") if entry.get(key)]
                paths += checkpoint_order(folder, loras)
    return paths


def started_ray_here() -> bool:
    """Whether `ray.init` started a local Ray in this process (rather than joining a cluster)."""
    node = getattr(ray._private.worker.global_worker, "node", None)
    return bool(getattr(node, "head", False))
