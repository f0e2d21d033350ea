"""DiT deployment: one VTA denoising step per call, no request state kept between calls.

The LoRA combination is the multiplexed model id (``pusa=1.4``, ``lightx2v=1.0,pusa=1.4``: the Pusa
LoRA's alpha and any of the registry's LoRAs, `pusa_model.loras.combination_id`): Serve routes a request
to a replica that already holds its combination when it can; otherwise the replica re-fuses from the base
weights (one combination per replica; `stats` counts the fuses).

With ``parallel`` (app arg ``dit_parallel``) of G = cfg·ulysses > 1 the replica holds no model: it
drives G worker actors, one per GPU of its placement group (`deployments.dit_group`).

A two-expert model (Pusa-Wan2.2) is served by this class bound once per expert (``expert`` 0 and 1, under
the names ``DiTHigh`` and ``DiTLow``): each replica loads its expert's transformer and LoRA stack only, and
runs only that expert's steps.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time

import numpy as np
import ray
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from pusa_jobs.observability import gpu_kind, job_logging, metrics
from pusa_model.devices import gpu_memory, pick_device, release_on_oom
from pusa_model.loras import PUSA, LoraRegistry, combination_id, parse_combination_id
from pusa_model.operations import StepInput
from pusa_model.presets import get_preset
from pusa_model.request_schema import SIZE_MULTIPLE, VAE_TEMPORAL

from .dit_group import DiTGroup, DiTParallel

logger = logging.getLogger("ray.serve")


EXPERT_DEPLOYMENTS = ("DiTHigh", "DiTLow")  # a two-expert model's DiT deployments, by expert


def alpha_model_id(alpha: float) -> str:
    """The multiplexed model id of the Pusa LoRA alone at strength `alpha`."""
    return combination_id({PUSA: alpha})


class WarmUpShape(BaseModel):
    """A request shape a DiT replica runs one step at before it reports healthy (app arg ``dit_warmup``):
    a compiled DiT compiles for it then, or loads its kernels from the node's compile cache."""

    model_config = ConfigDict(extra="forbid")

    width: int = Field(ge=SIZE_MULTIPLE, multiple_of=SIZE_MULTIPLE)
    height: int = Field(ge=SIZE_MULTIPLE, multiple_of=SIZE_MULTIPLE)
    frames: int = Field(ge=1)
    guidance: float = Field(default=5.0, ge=1.0)  # 1: the one-pass shape of the fast mode

    @model_validator(mode="after")
    def _frames_4k_plus_1(self) -> WarmUpShape:
        if (self.frames - 1) % VAE_TEMPORAL:
            raise ValueError(f"frames must be of the form 4k+1, got {self.frames}")
        return self


@serve.deployment(name="DiT")
class DiT:
    """Holds the 14B transformer with one combination of LoRAs fused (or a group of G ranks that do):
    the Pusa LoRA and the registry's `loras` (app arg ``loras``), base weights per `lora_base`."""

    def __init__(
        self, preset: str = "tiny", device: str | None = None, options: dict | None = None,
        parallel: dict | None = None, loras: dict | None = None, lora_base: str = "disk",
        warmup: list[dict] | None = None, memory_gib: float | None = None, expert: int | None = None,
    ) -> None:
        from pusa_model.pipeline import load_dit_stage, model_folder  # the model code: in the replica only
        from pusa_model.transformer import DiTOptions

        layout = DiTParallel.model_validate(parallel or {})
        dit_options = DiTOptions(**(options or {}))
        registry = LoraRegistry.model_validate(loras or {})
        shapes = [WarmUpShape.model_validate(shape).model_dump() for shape in warmup or []]
        started = time.perf_counter()
        self.start_s: dict[str, float] = {}  # where the start went: loading, then each warm-up shape
        if expert is not None and layout.size > 1:
            raise ValueError("a per-expert DiT deployment runs on one GPU; dit_parallel is for one-expert models")
        if layout.size > 1:
            self.group = DiTGroup(preset, options or {}, layout, registry.model_dump(), lora_base, shapes)
        else:
            self.group = None
            spec = get_preset(preset)
            self.stage = load_dit_stage(model_folder(spec), spec, pick_device(device, memory_gib), dit_options,
                                        registry, lora_base, expert=expert)
            self.start_s["load"] = round(time.perf_counter() - started, 2)
            for i, shape in enumerate(shapes):
                shape_started = time.perf_counter()
                self.stage.warm_up(**shape)
                self.start_s[f"warmup_{i}"] = round(time.perf_counter() - shape_started, 2)
        self.ready_s = time.perf_counter() - started  # loading and warm-up: what Serve waits for
        logger.info("DiT ready in %.1f s (%s; warm-up at %s)", self.ready_s, self.start_s, shapes or "no shape")
        self.steps_run = 0
        self.recent_steps: collections.deque[dict] = collections.deque(maxlen=64)  # {job_id, step, compute_s}
        self.fuses = 0  # combinations fused on this replica (a request whose combination it held: none)
        # One forward at a time, also when Serve cancels a call whose thread still computes.
        self._compute = threading.Lock()
        self.expert = expert  # None: the whole (one-expert) model
        self.deployment = "DiT" if expert is None else EXPERT_DEPLOYMENTS[expert]
        self.tags = {"preset": preset, "gpu": gpu_kind()}  # the step's metric also names the deployment
        self._compiled = str(bool(dit_options.compile)).lower()

    @serve.multiplexed(max_num_models_per_replica=1)
    async def load_loras(self, model_id: str) -> dict[str, float]:
        """Fuse the combination named by `model_id` (always from the base weights; nothing to do when it
        is fused already)."""
        combination = parse_combination_id(model_id)
        started = time.perf_counter()
        if self.group is not None:
            fused = await self.group.set_loras(combination)
        else:
            fused = await asyncio.to_thread(self._set_loras, combination)
        if fused:
            self.fuses += 1
            metrics().lora_fuse.observe(time.perf_counter() - started, tags=self.tags)
        return combination

    def _set_loras(self, combination: dict[str, float]) -> bool:
        with self._compute:  # never under a forward in flight
            return self.stage.set_loras(combination)

    def _step(self, inp: StepInput) -> np.ndarray:
        """The step on this replica's stage; at a window's last step also its peak GPU memory."""
        on_gpu = torch.cuda.is_available()
        with self._compute:
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            out = release_on_oom(self.stage.run, inp)
            self.steps_run += 1
            if on_gpu and inp.last:
                metrics().memory_peak.observe(torch.cuda.max_memory_allocated(), tags=self.tags)
        return out

    async def step(self, inp: StepInput, job_id: str | None = None) -> np.ndarray:
        """Step `inp` of a job (its text an object-store reference, or the embeddings); returns the next
        latents, computed with the LoRA combination of the multiplexed model id and the attention kernel of
        the request's mode (``dit_options.fast_attention`` for "fast")."""
        with job_logging(job_id):
            model_id = serve.get_multiplexed_model_id()
            if model_id:
                await self.load_loras(model_id)
            if isinstance(inp.text, ray.ObjectRef):
                inp = inp.with_text(await inp.text)
            first = self.steps_run == 0
            started = time.perf_counter()
            if self.group is None:
                out = await asyncio.to_thread(self._step, inp)
            else:
                out = await self.group.step(inp)
                self.steps_run += 1
            seconds = time.perf_counter() - started
            self.recent_steps.append({"job_id": job_id, "step": inp.step, "compute_s": round(seconds, 4)})
            metrics().stage.observe(seconds, tags={"stage": "dit_step", "deployment": self.deployment, **self.tags})
            if first:
                metrics().first_step.observe(seconds, tags={**self.tags, "compiled": self._compiled})
            return out

    async def stats(self) -> dict:
        """This replica's pid, its expert (None: a one-expert model's DiT), steps run, fused combination
        (``loras``; ``lora_alpha``: the Pusa LoRA's), the attention backend of its last step (``attention``), how many combinations it fused, where its
        start went (``start_s``: loading, each warm-up shape), the compute time of its last 64 steps inside
        the replica (``recent_steps``: job, step, seconds) and, on a GPU, its memory (``gpu_memory``:
        allocated, reserved and the cap, bytes) (for operators and tests); with a group also its layout
        (``parallel``), every rank's (``workers``; empty while a lost group waits to be rebuilt) and how
        often it was rebuilt."""
        common = {"pid": os.getpid(), "expert": self.expert, "steps_run": self.steps_run, "fuses": self.fuses,
                  "ready_s": self.ready_s, "start_s": self.start_s, "recent_steps": list(self.recent_steps), "gpu_memory": gpu_memory()}
        if self.group is None:
            return {**common, "lora_alpha": self.stage.lora_alpha, "loras": self.stage.loras,
                    "attention": self.stage.attention}
        loras = self.group.loras
        return {**common, "lora_alpha": (loras or {}).get(PUSA), "loras": loras,
                "parallel": self.group.layout.model_dump(), "workers": await self.group.stats(),
                "rebuilds": self.group.rebuilds}

    def check_health(self) -> None:
        """Unhealthy once a lost group could not be rebuilt: Serve then replaces the replica."""
        if self.group is not None and self.group.failed is not None:
            raise RuntimeError(f"DiT group could not be rebuilt: {self.group.failed!r}")

    def __del__(self) -> None:
        group = getattr(self, "group", None)
        if group is not None:
            group.shutdown()
