"""VTA sampling: initial latents with conditioning frames, and one denoising step.

Conditioning frames start at ``(1 - m) * z + m * eps`` with the same ``eps`` as the rest of the video
and then follow their own, ``m``-scaled trajectory; they are never re-injected. A step is stateless:
everything it needs is passed in, so any worker can take the next one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .schedule import frame_sigma_deltas, frame_timesteps

# velocity = model(latents, per-frame timesteps (B, F), text embeddings)
VelocityModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# guided velocity = guide(model, latents, timesteps, prompt, negative prompt, guidance scale)
Guide = Callable[[VelocityModel, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float], torch.Tensor]


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal noise from `seed`, drawn on the CPU in float32 so every device agrees."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def _over_frames(values: torch.Tensor) -> torch.Tensor:
    """(F,) -> (1, 1, F, 1, 1) to broadcast over latents (B, C, F, H, W)."""
    return values.view(1, 1, -1, 1, 1)


def initial_latents(noise: torch.Tensor, clean: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """``x = (1 - m) * clean + m * noise`` per frame; free frames (m = 1) are pure noise.

    noise, clean: ``(B, C, F, H, W)`` (clean is zero on free frames); multipliers: ``(F,)``.
    """
    m = _over_frames(multipliers.to(noise))
    return noise * m + clean.to(noise) * (1 - m)


def guided_velocity(
    model: VelocityModel,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    guidance: float,
) -> torch.Tensor:
    """Classifier-free guided velocity; the unconditional pass is skipped at guidance 1.0."""
    velocity = model(latents, timesteps, prompt_embeds)
    if guidance == 1.0 or negative_embeds is None:
        return velocity
    uncond = model(latents, timesteps, negative_embeds)
    return uncond + guidance * (velocity - uncond)


def denoise_step(
    model: VelocityModel,
    latents: torch.Tensor,
    step: int,
    sigmas: torch.Tensor,
    multipliers: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    guidance: float,
    guide: Guide = guided_velocity,
) -> torch.Tensor:
    """One VTA Euler step: per-frame timesteps, guided velocity (`guide`), per-frame update.
    Returns new latents."""
    batch = latents.shape[0]
    timesteps = frame_timesteps(sigmas, multipliers, step).to(latents.device).expand(batch, -1)
    velocity = guide(model, latents, timesteps, prompt_embeds, negative_embeds, guidance)
    deltas = _over_frames(frame_sigma_deltas(sigmas, multipliers, step).to(latents))
    return latents + velocity.to(latents.dtype) * deltas
