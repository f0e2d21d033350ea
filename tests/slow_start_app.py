"""The application of `deployments.app` with a DiT that takes `dit_start_delay_s` longer to start, as a
14B DiT loading its weights does: for tests of the service's loading state (an ``import_path`` of a
Serve config, importable by Ray's workers with this folder on ``PYTHONPATH``)."""

from __future__ import annotations

import time

from ray import serve

import deployments.app
from deployments.dit import DiT


def build_app(args: dict) -> serve.Application:
    args = dict(args)
    delay_s = float(args.pop("dit_start_delay_s", 0))

    @serve.deployment(name="DiT")
    class SlowDiT(DiT.func_or_class):
        def __init__(self, *a, **kw) -> None:
            time.sleep(delay_s)
            super().__init__(*a, **kw)

    real = deployments.app.DiT
    deployments.app.DiT = SlowDiT
    try:
        return deployments.app.build_app(args)
    finally:
        deployments.app.DiT = real
