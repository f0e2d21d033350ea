"""DiT deployment: one VTA denoising step per call, no request state kept between calls.

The LoRA strength is the multiplexed model id (``alpha=1.4``): Serve routes a request to a replica
that already holds its alpha when it can; otherwise the replica re-fuses from the base weights.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
import torch
from ray import serve

from pusa_model.pipeline import load_dit_stage, model_folder
from pusa_model.presets import get_preset
from pusa_model.sampler import initial_latents, initial_noise
from pusa_model.transformer import DiTOptions

from .devices import pick_device


def alpha_model_id(alpha: float) -> str:
    """The multiplexed model id that stands for LoRA strength `alpha`."""
    return f"alpha={alpha:g}"


@serve.deployment(name="DiT")
class DiT:
    """Holds the 14B transformer with the Pusa LoRA fused at one alpha."""

    def __init__(self, preset: str = "tiny", device: str | None = None, options: dict | None = None) -> None:
        spec = get_preset(preset)
        self.stage = load_dit_stage(model_folder(spec), spec, pick_device(device), DiTOptions(**(options or {})))
        self.steps_run = 0

    @serve.multiplexed(max_num_models_per_replica=1)
    async def load_alpha(self, model_id: str) -> float:
        """Fuse the LoRA at the alpha named by `model_id` (always from the base weights)."""
        alpha = float(model_id.removeprefix("alpha="))
        await asyncio.to_thread(self.stage.set_lora_alpha, alpha)
        return alpha

    def _step(self, latents, clean, seed, step, sigmas, multipliers, text, guidance) -> np.ndarray:
        sigmas, multipliers = torch.tensor(sigmas), torch.tensor(multipliers)
        if latents is None:  # step 0 starts from the seed's noise and the clean conditioning
            clean = torch.from_numpy(clean)
            x = initial_latents(initial_noise(tuple(clean.shape), seed), clean, multipliers)
        else:
            x = torch.from_numpy(latents)
        prompt, negative = (None if t is None else torch.from_numpy(t) for t in text)
        out = self.stage.step(x, step, sigmas, multipliers, prompt, negative, guidance)
        self.steps_run += 1
        return out.numpy()

    async def step(
        self,
        latents: np.ndarray | None,
        clean: np.ndarray | None,
        seed: int,
        step: int,
        sigmas: list[float],
        multipliers: list[float],
        text: tuple[np.ndarray, np.ndarray | None],
        guidance: float,
    ) -> np.ndarray:
        """Step `step` of a job: returns the next latents. At step 0 pass `latents=None` and the
        clean conditioning latents; later steps pass the previous step's latents."""
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.load_alpha(model_id)
        return await asyncio.to_thread(
            self._step, latents, clean, seed, step, sigmas, multipliers, text, guidance
        )

    def stats(self) -> dict:
        """This replica's pid, steps run and fused alpha (for operators and tests)."""
        return {"pid": os.getpid(), "steps_run": self.steps_run, "lora_alpha": self.stage.lora_alpha}
