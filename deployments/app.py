"""The Serve application: the Router (HTTP) and the Runner (jobs) over the TextEncoder, VAE and DiT, and with
``wan22_preset`` Pusa-Wan2.2's DiTHigh and DiTLow beside them (one application serving both models).

`serve run serve_config.yaml` (production, A6000 nodes) and `serve run serve_config.local.yaml`
(the embedded tiny preset on CPU) both import `deployments.app:build_app` and pass it `args`.
Resources, replicas and autoscaling come from the config's per-deployment settings.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, PositiveFloat, model_validator
from ray.serve import Application

from pusa_batch.run import BatchSettings
from pusa_jobs.submission import MODEL_NAME, WAN22_MODEL_NAME
from pusa_jobs.webhooks import WebhookSettings
from pusa_model.loras import LoraRegistry

from .dit import EXPERT_DEPLOYMENTS, DiT, WarmUpShape
from .dit_group import DiTParallel
from .admission import ApiSettings
from .router import Router
from .runner import Runner, RunnerSettings
from .text_encoder import TextEncoder
from .vae import VAE


class AppArgs(BaseModel):
    """Arguments of `build_app` (the ``args`` of a Serve config application)."""

    model_config = ConfigDict(extra="forbid")

    preset: str = "tiny"  # Pusa V1's (model pusa-v1); its TextEncoder and VAE serve every model of the app
    # Pusa-Wan2.2 (model pusa-wan2.2) beside it: its preset, the DiT deployments DiTHigh and DiTLow (one
    # per expert) load it; None: the app serves pusa-v1 only. Wan2.2-A14B's text encoder and VAE are
    # Wan2.1's, so the app's TextEncoder and VAE (of `preset`) serve it too.
    wan22_preset: Literal["tiny-wan2.2", "pusa-wan2.2"] | None = None
    store: str = "data"  # blobs (inputs, results, checkpoints): a folder, or s3://bucket/prefix
    # job records: sqlite:///path (one node) or postgresql+psycopg://user@host/db (password from PGPASSWORD)
    database: str = "sqlite:///data/jobs.db"
    retention_s: float = 7 * 86400  # an ended job's record and files are deleted this long after it ended
    vae_tiling: bool = False
    # the VAE's decoder in this type (its encoder and encodes stay float32); None: float32
    vae_decode_dtype: Literal["bfloat16", "float16"] | None = None
    # pusa_model.transformer.DiTOptions: compile, attention, fast_attention (mode fast's), fuse_qkv, quantize.
    # attention / fast_attention: auto (FA3 bf16 on sm90 with fa3-fwd, else cuDNN SDPA; flash SDPA on
    # sm80/86), sdpa, auto_8bit (FA3 FP8 on sm90, SageAttention on sm80/86/89), fa3, fa3_fp8, sage, flash,
    # xformers; a choice that cannot run falls back with a warning saying why (docs/design.md, pusa_model/attention.py)
    dit_options: dict = {}
    # DiTHigh's and DiTLow's options, as dit_options (None: dit_options), e.g. {quantize: int8} for the
    # layout that puts both experts on one 48 GB card (docs/deploy.md, "Pusa-Wan2.2 on A6000 nodes")
    wan22_dit_options: dict | None = None
    # GPUs per DiT replica, {cfg: 1|2, ulysses: U}: G = cfg*U > 1 needs the DiT deployment's
    # placement_group_bundles (G one-GPU bundles, STRICT_PACK); see deployments/dit_group.py
    dit_parallel: DiTParallel = DiTParallel()
    # request shapes, [{width, height, frames, guidance}], each DiT replica runs one step at before it reports
    # healthy: compiled, it compiles for them then (or loads the node's compile cache), not in a user's request
    dit_warmup: list[WarmUpShape] = []
    # LoRAs a request may fuse beside the Pusa LoRA, {name: {path, alpha, fast}} (pusa_model/loras.py); the
    # one with fast: true is what mode "fast" adds. lora_base: where the DiT keeps the base weights it
    # re-fuses from on a switch: disk (re-read from the checkpoint), cpu or device (a resident copy)
    loras: LoraRegistry = LoraRegistry()
    lora_base: Literal["disk", "cpu", "device"] = "disk"
    # the registry of Pusa-Wan2.2's requests and of DiTHigh and DiTLow, as `loras`, each entry with a file per
    # expert (path: high noise, path_2: low noise), e.g. Wan2.2-Lightning's 4-step pair with fast: true
    wan22_loras: LoraRegistry = LoraRegistry()
    # GiB of GPU memory each GPU deployment's replica may allocate (torch's per-process cap), e.g.
    # {DiT: 47.5, TextEncoder: 23.5, VAE: 23.5}: an A6000 layout emulated on one larger card, or replicas
    # sharing a card kept within their share. Past it a request fails with out of memory, as on that card.
    gpu_memory_gib: dict[Literal["TextEncoder", "VAE", "DiT", "DiTHigh", "DiTLow"], PositiveFloat] = {}
    api: ApiSettings = ApiSettings()
    runner: RunnerSettings = RunnerSettings()
    webhooks: WebhookSettings = WebhookSettings()
    # the pools of batches submitted through /v1/batches (pusa_batch.run.BatchSettings; preset: the app's)
    batch: dict = {}

    @model_validator(mode="after")
    def _memory_cap_of_one_gpu(self) -> AppArgs:
        if "DiT" in self.gpu_memory_gib and self.dit_parallel.size > 1:
            raise ValueError("gpu_memory_gib.DiT caps a one-GPU DiT replica; it cannot be combined with dit_parallel")
        return self

    @model_validator(mode="after")
    def _a_file_per_expert(self) -> AppArgs:
        for name, entry in self.wan22_loras.root.items():
            if entry.path_2 is None:
                raise ValueError(f"wan22_loras.{name}: a Wan2.2 LoRA needs a file per expert (path and path_2)")
        for name, entry in self.loras.root.items():
            if entry.path_2 is not None:
                raise ValueError(f"loras.{name}: path_2 is for wan22_loras (Pusa V1 has one transformer)")
        return self

    @property
    def models(self) -> dict[str, str]:
        """The models the app serves, name -> preset."""
        return {MODEL_NAME: self.preset, **({WAN22_MODEL_NAME: self.wan22_preset} if self.wan22_preset else {})}


def build_app(args: dict) -> Application:
    """Bind the deployments for `args` (see `AppArgs`)."""
    a = AppArgs.model_validate(args)
    batch = {"loras": a.loras.model_dump(), "lora_base": a.lora_base, **a.batch}  # the app's LoRAs unless set there
    BatchSettings.model_validate({"preset": a.preset, **batch})  # a bad batch section fails the deploy here
    memory = a.gpu_memory_gib
    dit_args = dict(options=a.dit_options, lora_base=a.lora_base, warmup=[shape.model_dump() for shape in a.dit_warmup])
    expert_args = {**dit_args, "options": a.dit_options if a.wan22_dit_options is None else a.wan22_dit_options}
    experts = {} if a.wan22_preset is None else {
        key: DiT.options(name=name).bind(preset=a.wan22_preset, expert=e, memory_gib=memory.get(name),
                                         loras=a.wan22_loras.model_dump(), **expert_args)
        for e, (key, name) in enumerate(zip(("dit_high", "dit_low"), EXPERT_DEPLOYMENTS))}
    runner = Runner.bind(
        TextEncoder.bind(preset=a.preset, memory_gib=memory.get("TextEncoder")),
        VAE.bind(preset=a.preset, store=a.store, tiling=a.vae_tiling, decode_dtype=a.vae_decode_dtype,
                 memory_gib=memory.get("VAE"), media_limits=a.api.media.model_dump()),
        DiT.bind(preset=a.preset, parallel=a.dit_parallel.model_dump(), memory_gib=memory.get("DiT"),
                 loras=a.loras.model_dump(), **dit_args),
        preset=a.preset, store=a.store, database=a.database, settings=a.runner.model_dump(),
        webhooks=a.webhooks.model_dump(), retention_s=a.retention_s, batch=batch, models=a.models, **experts,
        wan22_loras=a.wan22_loras.model_dump(),  # a pusa-wan2.2 batch's registry
    )
    return Router.bind(runner, preset=a.preset, store=a.store, database=a.database, api=a.api.model_dump(),
                       webhooks=a.webhooks.model_dump(), loras=a.loras.model_dump(), retention_s=a.retention_s,
                       models=a.models, wan22_loras=a.wan22_loras.model_dump())
