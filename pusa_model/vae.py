"""The VAE stage: conditioning frames to normalised latents, and latents back to pixels.

Latents are normalised with the Wan VAE's per-channel ``latents_mean`` / ``latents_std`` (as
diffusers' Wan pipelines do), so the DiT sees unit-scale latents. Pixels are ``(3, T, H, W)`` in
``[-1, 1]``.
"""

from __future__ import annotations

import threading

import torch
from diffusers import AutoencoderKLWan


class VAEStage:
    """Encodes images and clips into latents and decodes generated latents.

    Thread-safe: the Wan VAE keeps its causal-convolution cache on the module during a call, so
    calls on one model run one at a time.
    """

    def __init__(self, vae: AutoencoderKLWan, tiling: bool = False) -> None:
        self.vae = vae
        self.device = next(vae.parameters()).device
        self.dtype = next(vae.parameters()).dtype
        shape = (1, vae.config.z_dim, 1, 1, 1)
        self._mean = torch.tensor(vae.config.latents_mean).view(shape)
        self._std = torch.tensor(vae.config.latents_std).view(shape)
        self._lock = threading.Lock()
        if tiling:
            vae.enable_tiling()

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(3, T, H, W)`` pixels -> normalised latents ``(1, 16, (T-1)//4+1, H/8, W/8)`` on the CPU.

        A single image is a one-frame clip (T = 1) and becomes one latent frame.
        """
        x = pixels.unsqueeze(0).to(self.device, self.dtype)
        with self._lock:
            latents = self.vae.encode(x).latent_dist.mode().float().cpu()
        return (latents - self._mean) / self._std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(1, 16, F, h, w)`` -> pixels ``(3, 4(F-1)+1, 8h, 8w)`` in [-1, 1], CPU."""
        z = latents.float() * self._std + self._mean
        with self._lock:
            video = self.vae.decode(z.to(self.device, self.dtype)).sample
        return video[0].float().clamp(-1, 1).cpu()
