"""`pusa-serve`: start the service from a Serve config, print its URL once it runs — or say what cannot start.

The config's HTTP port answers from the command's first second: `LoadingPort` holds it with the loading state
(503, ``Retry-After``) while Ray, Serve and the model code are imported and started, and hands it to Serve's
proxy once that listens (`deployments.loading_port`). This module imports only the standard library and YAML
before the port is open.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import yaml

from pusa_model.readahead import ReadAhead, package_folders

from .loading_port import LoadingPort

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "serve_config.local.yaml"
# What every model replica imports, read ahead first: the build task and the replicas import them right away.
READ_AHEAD_PACKAGES = ("torch", "nvidia", "triton", "torchao", "diffusers", "transformers", "safetensors",
                       "tokenizers", "numpy", "imageio_ffmpeg")
SERVE_HTTP_DEFAULTS = {"host": "127.0.0.1", "port": 8000}  # Serve's http_options where a config leaves them out


def hold_port(raw_config: dict) -> LoadingPort | None:
    """The config's HTTP port, answering the loading state until Serve's proxy takes it (None: not held)."""
    if raw_config.get("proxy_location") == "Disabled":
        return None
    http = {**SERVE_HTTP_DEFAULTS, **(raw_config.get("http_options") or {})}
    return LoadingPort.open(http["host"], int(http["port"]))


def report(name: str, reader: ReadAhead) -> None:
    done = reader.wait(timeout=0)
    print(f"pusa-serve: read ahead {name}: {done['bytes'] / 1e9:.1f} of {done['planned_bytes'] / 1e9:.1f} GB"
          + (f" in {done['seconds']} s" if done["done"] else " so far"), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pusa-serve", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", type=Path, default=DEFAULT_CONFIG, help="Serve config YAML")
    parser.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for every replica")
    parser.add_argument("--no-block", action="store_true", help="return once running (leave Serve up)")
    parser.add_argument("--read-ahead", action="store_true",
                        help="read the model packages and, once Ray runs, the local checkpoint into this node's page "
                             "cache while the service starts (a node whose disk cache is cold)")
    args = parser.parse_args(argv)

    raw_config = yaml.safe_load(args.config.read_text())
    port = hold_port(raw_config)
    threads = min(16, os.cpu_count() or 1)
    packages = ReadAhead(package_folders(READ_AHEAD_PACKAGES), threads) if args.read_ahead else None
    # Ray, Serve and the model code: seconds to import, so only now that the port answers
    import ray  # noqa: PLC0415
    from ray import serve  # noqa: PLC0415
    from ray.serve.schema import ServeDeploySchema  # noqa: PLC0415

    from . import launch  # noqa: PLC0415
    from .admission import check_exposure  # noqa: PLC0415

    config = ServeDeploySchema.model_validate(raw_config)
    host = config.http_options.host
    for app in config.applications:
        auth = ((app.args or {}).get("api") or {}).get("auth", "keys")
        try:
            check_exposure(auth, host)
        except ValueError as exc:
            print(f"pusa-serve: refusing to start {app.name}: {exc}", file=sys.stderr)
            return 1
        if auth == "none":
            print(f"pusa-serve: {app.name} runs without API keys: it listens on {host} (loopback) only",
                  file=sys.stderr)
    ray.init(address=args.address, namespace="serve")
    # the checkpoint only once Ray runs: read beside Ray's start, it made ray.init 20 s slower (docs/benchmarks.md)
    checkpoint = ReadAhead(launch.checkpoint_paths(config), threads) if args.read_ahead else None
    problems = launch.deploy(config, args.start_timeout, on_proxies_up=port.hand_over if port else None)
    if problems:
        print(f"pusa-serve: not running after {args.start_timeout:g}s:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr, flush=True)
        if not launch.started_ray_here():  # a cluster we joined: take the half-deployed app down again
            serve.shutdown()
        return 1  # a Ray this process started goes down with it, without waiting for replicas
    if args.read_ahead:
        report("the packages", packages)
        report("the checkpoints", checkpoint)
    http = config.http_options
    print(f"Pusa service ready at http://{http.host}:{http.port}", flush=True)
    if args.no_block:
        return 0
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop: the same clean end as Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("pusa-serve: stopping", file=sys.stderr, flush=True)
        serve.shutdown()
        ray.shutdown()
    return 0


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
