"""Start the real Serve application on a local Ray for tests, from the local config profile. The test process
keeps one local Ray between services that start it the same way (`local_ray`); Serve itself is shut down
after each service."""

from __future__ import annotations

import copy
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import ray
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from deployments.launch import deploy

LOCAL_CONFIG = Path(__file__).resolve().parent.parent / "serve_config.local.yaml"


_RAY_OPTIONS: dict | None = None  # how the local Ray this process keeps was started (None: none is)


def local_ray(num_cpus: int = 2, num_gpus: int | None = None, env: dict | None = None,
              metrics_port: int | None = None) -> None:
    """A local Ray in this process with these options: the one already running if it was started with the same
    ones, else a new one (the old one shut down). `num_gpus`: logical GPUs (default: those Ray detects);
    `metrics_port`: where Ray's metrics agent serves Prometheus metrics (reported every second)."""
    global _RAY_OPTIONS
    options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "env": env or {}, "metrics_port": metrics_port}
    if options == _RAY_OPTIONS and ray.is_initialized():
        return
    stop_ray()
    metrics = {} if metrics_port is None else {
        "_metrics_export_port": metrics_port, "_system_config": {"metrics_report_interval_ms": 1000}}
    # log_to_driver: replica logs stay in the session folder; failures surface in jobs
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, namespace="serve",
             runtime_env={"env_vars": env or {}}, include_dashboard=False, log_to_driver=False, **metrics)
    _RAY_OPTIONS = options


def stop_ray() -> None:
    """Shut down this process's local Ray, if it has one."""
    global _RAY_OPTIONS
    if ray.is_initialized():
        ray.shutdown()
    _RAY_OPTIONS = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_config(store: str, port: int, runner: dict | None = None, deployments: dict | None = None,
                 args: dict | None = None, api: dict | None = None, database: str | None = None) -> dict:
    """serve_config.local.yaml with the store, port, runner and API settings, per-deployment options (a
    deployment the profile has no section for gets one) and extra application args given. The job database
    defaults to a SQLite file beside a local store."""
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"].update(copy.deepcopy(args or {}))
    app["args"]["store"] = store
    app["args"]["database"] = database or default_database(store)
    app["args"]["runner"] = {**app["args"].get("runner", {}), **(runner or {})}
    app["args"]["api"] = {**app["args"].get("api", {}), **(api or {})}
    for dep in app["deployments"]:
        dep.update(copy.deepcopy((deployments or {}).get(dep["name"], {})))
    profiled = {dep["name"] for dep in app["deployments"]}
    app["deployments"] += [{"name": name, **copy.deepcopy(options)}  # e.g. DiTHigh, DiTLow (args.wan22_preset)
                           for name, options in (deployments or {}).items() if name not in profiled]
    return config


def new_version(app: dict, deployment: str, version: str) -> None:
    """Give `deployment` of `app` (an application of a Serve config) a new version, an environment variable of its
    replicas: Serve replaces that deployment's replicas and keeps the others (changed app args would replace
    every replica of the app)."""
    dep = next(d for d in app["deployments"] if d["name"] == deployment)
    options = dep.setdefault("ray_actor_options", {})
    options["runtime_env"] = {"env_vars": {"PUSA_TEST_VERSION": version}}


def default_database(store: str) -> str:
    """A SQLite file next to a local store's folder (in a fresh temporary folder for an S3 store)."""
    folder = Path(tempfile.mkdtemp(prefix="pusa-db-")) if store.startswith("s3://") else Path(store).parent
    return f"sqlite:///{folder / 'jobs.db'}"


@contextmanager
def running_service(store: str, runner: dict | None = None, deployments: dict | None = None,
                    start_timeout_s: float = 180, env: dict | None = None, args: dict | None = None,
                    num_gpus: int | None = None, api: dict | None = None, database: str | None = None,
                    metrics_port: int | None = None):
    """Yield the base URL of the service deployed from the local profile on `local_ray` (`num_gpus`, e.g.
    for placement-group bundles of one GPU on a CPU-only machine; `env`; `metrics_port`); shut Serve down
    after."""
    port = free_port()
    config = ServeDeploySchema.model_validate(local_config(store, port, runner, deployments, args, api, database))
    local_ray(num_gpus=num_gpus, env=env, metrics_port=metrics_port)
    try:
        problems = deploy(config, start_timeout_s)
        assert not problems, problems
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the proxy learns the routes shortly after RUNNING
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        serve.shutdown()
