"""The Serve application: TextEncoder, VAE and DiT deployments behind the Router.

`serve run serve_config.yaml` (production, A6000 nodes) and `serve run serve_config.local.yaml`
(the embedded tiny preset on CPU) both import `deployments.app:build_app` and pass it `args`.
Resources, replicas and autoscaling come from the config's per-deployment settings.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from ray.serve import Application

from .dit import DiT
from .dit_group import DiTParallel
from .router import Router
from .text_encoder import TextEncoder
from .vae import VAE


class AppArgs(BaseModel):
    """Arguments of `build_app` (the ``args`` of a Serve config application)."""

    model_config = ConfigDict(extra="forbid")

    preset: str = "tiny"
    store: str = "data"  # a folder, or s3://bucket/prefix
    vae_tiling: bool = False
    dit_options: dict = {}  # pusa_model.transformer.DiTOptions: compile, attention, fuse_qkv
    # GPUs per DiT replica, {cfg: 1|2, ulysses: U}: G = cfg*U > 1 needs the DiT deployment's
    # placement_group_bundles (G one-GPU bundles, STRICT_PACK); see deployments/dit_group.py
    dit_parallel: DiTParallel = DiTParallel()
    max_upload_bytes: int = 64 << 20
    runner: dict = {}


def build_app(args: dict) -> Application:
    """Bind the four deployments for `args` (see `AppArgs`)."""
    a = AppArgs.model_validate(args)
    return Router.bind(
        TextEncoder.bind(preset=a.preset),
        VAE.bind(preset=a.preset, store=a.store, tiling=a.vae_tiling),
        DiT.bind(preset=a.preset, options=a.dit_options, parallel=a.dit_parallel.model_dump()),
        preset=a.preset,
        store=a.store,
        max_upload_bytes=a.max_upload_bytes,
        runner=a.runner,
    )
