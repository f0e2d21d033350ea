"""Calls from the runner to the TextEncoder, VAE and DiT deployments (a two-expert model's step goes to the
DiT deployment of its expert), each with a timeout and retries.

A call that times out (a hung replica), whose replica dies, or that fails because the blob store is
briefly unreachable is retried after a growing delay, a bounded number of times; Serve sends the retry to
a healthy replica. A call that can never succeed (out of GPU memory, a bug) fails the job at once with a
reason a user can act on. Timeouts grow with the request's size: ``base_s + per_megavoxel_s · W·H·frames
/ 10⁶`` (times the number of guidance passes for a DiT step).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import ray
import torch
from pydantic import BaseModel, ConfigDict
from ray.exceptions import ActorUnavailableError, RayActorError, TaskCancelledError
from ray.serve.exceptions import (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError,
                                  RequestCancelledError)
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from pusa_jobs.storage import StoreUnavailable
from pusa_model.errors import InvalidRequest
from pusa_model.loras import combination_id
from pusa_model.operations import StepInput
from pusa_model.request import GenerationPlan

logger = logging.getLogger("ray.serve")

# Failures of the replica rather than of the request: another replica may well succeed.
RETRYABLE = (RayActorError, ActorUnavailableError, ReplicaUnavailableError, DeploymentUnavailableError,
             BackPressureError, TaskCancelledError, RequestCancelledError, StoreUnavailable)

OnRetry = Callable[[str, int, str, str], Awaitable[None]]  # (stage, attempt, cause, reason)


class StageFailed(Exception):
    """A stage call that cannot succeed, or that failed on every attempt; the job fails with `code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class StageTimeout(BaseModel):
    """How long one call of a stage may take, by the request's size."""

    model_config = ConfigDict(extra="forbid")

    base_s: float
    per_megavoxel_s: float = 0.0

    def seconds(self, megavoxels: float) -> float:
        return self.base_s + self.per_megavoxel_s * megavoxels


class StageSettings(BaseModel):
    """Timeouts and retries of stage calls (app arg ``runner.stages``). The defaults leave room for an
    RTX A6000 at 720p; a timeout only has to catch a replica that stopped answering."""

    model_config = ConfigDict(extra="forbid")

    retries: int = 4
    backoff_s: float = 1.0  # delay before the first retry, doubled for each further one
    backoff_max_s: float = 15.0
    text_encode: StageTimeout = StageTimeout(base_s=120)
    vae_encode: StageTimeout = StageTimeout(base_s=120, per_megavoxel_s=2)
    dit_step: StageTimeout = StageTimeout(base_s=120, per_megavoxel_s=3)  # per guidance pass
    vae_decode: StageTimeout = StageTimeout(base_s=120, per_megavoxel_s=2)


def _unrecoverable(exc: BaseException, plan: GenerationPlan) -> Exception | None:
    """The job-ending form of a stage error that a retry cannot fix (the replica's own exception when it
    names a field of the request), else None."""
    cause = getattr(exc, "cause", None) or exc  # a replica's exception arrives as a RayTaskError
    if isinstance(cause, InvalidRequest):
        return cause
    if isinstance(cause, torch.OutOfMemoryError):
        return StageFailed("out_of_memory", f"the GPU ran out of memory for {plan.width}x{plan.height} with "
                                            f"{plan.frames} frames; try a smaller size or fewer frames")
    return None


class Stages:
    """The stage deployments, as the runner calls them for one job's plan: the TextEncoder, the VAE, the DiT
    of a one-expert model and, where the app serves a two-expert model, its DiT deployment per expert
    (`experts`: high noise, low noise)."""

    def __init__(self, text: DeploymentHandle, vae: DeploymentHandle, dit: DeploymentHandle,
                 settings: StageSettings, experts: tuple[DeploymentHandle, ...] = ()) -> None:
        self.text, self.vae, self.dit = text, vae, dit
        self.experts = experts
        self.settings = settings

    def dit_of(self, plan: GenerationPlan, expert: int) -> DeploymentHandle:
        """The DiT deployment that runs `expert`'s steps of `plan`'s model."""
        if plan.experts == 1:
            return self.dit
        if len(self.experts) != plan.experts:
            raise StageFailed("model_not_served", "this deployment has no DiT deployments of a two-expert model")
        return self.experts[expert]

    async def call(self, stage: str, make_call: Callable[[], DeploymentResponse], timeout_s: float,
                   plan: GenerationPlan, on_retry: OnRetry) -> Any:
        """`make_call()`'s result, retried as the module describes; `StageFailed` when it gives up."""
        s = self.settings
        delay = s.backoff_s
        for attempt in range(1, s.retries + 2):
            response = make_call()
            try:
                return await asyncio.wait_for(_result(response), timeout_s)
            except asyncio.TimeoutError:
                response.cancel()
                cause, reason = "timeout", f"no answer within {timeout_s:.0f} s"
            except asyncio.CancelledError:  # the job stops (drain): withdraw the request too
                response.cancel()
                raise
            except StoreUnavailable as exc:
                cause, reason = "store_unavailable", f"store unavailable: {exc}"
            except RETRYABLE as exc:
                cause = reason = type(exc).__name__
            except Exception as exc:
                failed = _unrecoverable(exc, plan)
                if failed is None:
                    raise
                raise failed from exc
            if attempt > s.retries:
                raise StageFailed(f"{stage}_unavailable", f"{stage} failed {attempt} times; last: {reason}")
            logger.warning("%s attempt %d failed (%s); retrying in %.1f s", stage, attempt, reason, delay)
            await on_retry(stage, attempt, cause, reason)
            await asyncio.sleep(delay)
            delay = min(2 * delay, s.backoff_max_s)
        raise AssertionError("unreachable")

    async def encode_text(self, job_id: str, plan: GenerationPlan, on_retry: OnRetry) -> ray.ObjectRef:
        """The prompt's (and negative prompt's) embeddings, put in the object store once for every step."""
        prompt, negative = plan.prompts
        embeddings = await self.call("text_encoder", lambda: self.text.encode.remote(prompt, negative, job_id),
                                     self.settings.text_encode.seconds(0), plan, on_retry)
        return ray.put(embeddings)

    async def encode_conditioning(self, job_id: str, plan: GenerationPlan, inputs: dict[str, str],
                                  on_retry: OnRetry) -> np.ndarray:
        """Clean latents of `plan`, the first window, from the job's media (`inputs`: field -> store key)."""
        return await self.call(
            "vae", lambda: self.vae.encode_conditioning.remote(plan, inputs, job_id),
            self.settings.vae_encode.seconds(_megavoxels(plan)), plan, on_retry)

    async def encode_extension(self, job_id: str, plan: GenerationPlan, previous_key: str, on_retry: OnRetry
                               ) -> np.ndarray:
        """Clean latents of `plan`, a later window of a long video, from the stored frames of the one before."""
        return await self.call(
            "vae", lambda: self.vae.encode_extension.remote(plan, previous_key, job_id),
            self.settings.vae_encode.seconds(_megavoxels(plan)), plan, on_retry)

    async def step(self, job_id: str, plan: GenerationPlan, inp: StepInput, on_retry: OnRetry) -> np.ndarray:
        """Step `inp` of window `plan` on some replica of the DiT deployment of the step's expert that holds
        that expert's LoRA combination."""
        dit = self.dit_of(plan, inp.expert).options(
            multiplexed_model_id=combination_id(plan.lora_combination_of(inp.expert)))
        passes = 1 if inp.guidance == 1.0 else 2
        return await self.call("dit", lambda: dit.step.remote(inp, job_id),
                               self.settings.dit_step.seconds(_megavoxels(plan) * passes), plan, on_retry)

    async def decode(self, job_id: str, plan: GenerationPlan, latents: np.ndarray, on_retry: OnRetry) -> dict:
        return await self.call("vae", lambda: self.vae.decode_to_store.remote(job_id, latents, plan.request.fps),
                               self.settings.vae_decode.seconds(_megavoxels(plan)), plan, on_retry)

    async def decode_window(self, job_id: str, window: int, plan: GenerationPlan, latents: np.ndarray,
                            on_retry: OnRetry) -> str:
        return await self.call(
            "vae", lambda: self.vae.decode_window_to_store.remote(job_id, window, latents, plan.request.fps),
            self.settings.vae_decode.seconds(_megavoxels(plan)), plan, on_retry)

    async def stitch(self, job_id: str, plan: GenerationPlan, on_retry: OnRetry) -> dict:
        """The long video of `plan` from its stored windows."""
        return await self.call(
            "vae", lambda: self.vae.stitch_to_store.remote(job_id, len(plan.windows), plan.request.fps),
            self.settings.vae_decode.seconds(_megavoxels(plan)), plan, on_retry)


async def _result(response: DeploymentResponse) -> Any:
    return await response


def _megavoxels(plan: GenerationPlan) -> float:
    return plan.width * plan.height * plan.frames / 1e6
