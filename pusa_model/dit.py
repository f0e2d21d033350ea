"""The DiT stage: one VTA denoising step on WanTransformer3DModel, with the Pusa LoRA fused.

It keeps no request state: latents, schedule and embeddings come with every call, so consecutive
steps of one video can run on different replicas.
"""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel

from .lora import LoraFuser
from .sampler import Guide, denoise_step, guided_velocity
from .transformer import DiTOptions, apply_options, block_forward, forward_per_frame


class DiTStage:
    """Runs denoising steps; `lora_alpha` sets the fused LoRA strength (never accumulating).

    `options` (attention kernel, fused QKV, compile) are applied to `transformer` here, in place;
    None leaves the model as it is.
    """

    def __init__(
        self, transformer: WanTransformer3DModel, lora: LoraFuser | None = None, options: DiTOptions | None = None
    ) -> None:
        self.transformer = transformer
        self.lora = lora
        self.device = next(transformer.parameters()).device
        self.dtype = transformer.patch_embedding.weight.dtype  # some parameters stay float32
        self._block_fn = block_forward if options is None else apply_options(transformer, options)
        self.guide: Guide = guided_velocity  # how the conditional and unconditional passes combine

    @property
    def lora_alpha(self) -> float | None:
        return None if self.lora is None else self.lora.alpha

    def set_lora_alpha(self, alpha: float) -> None:
        """Fuse the LoRA at `alpha` from the base weights (no-op when already there or no LoRA)."""
        if self.lora is not None and self.lora.alpha != alpha:
            self.lora.fuse(alpha)

    def velocity(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The DiT's velocity for float32 latents, with per-frame `timesteps` ``(B, F)``."""
        x = latents.to(self.device, self.dtype)
        text = text.to(self.device, self.dtype)
        out = forward_per_frame(self.transformer, x, timesteps.to(self.device), text, self._block_fn)
        return out.float()

    @torch.no_grad()
    def step(
        self,
        latents: torch.Tensor,
        step: int,
        sigmas: torch.Tensor,
        multipliers: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None,
        guidance: float,
        lora_alpha: float | None = None,
    ) -> torch.Tensor:
        """Step `step` of the schedule `sigmas` from `latents`; returns the next latents on the CPU."""
        if lora_alpha is not None:
            self.set_lora_alpha(lora_alpha)
        x = latents.to(self.device, torch.float32)
        out = denoise_step(
            self.velocity, x, step, sigmas, multipliers, prompt_embeds, negative_embeds, guidance, self.guide
        )
        return out.cpu()
