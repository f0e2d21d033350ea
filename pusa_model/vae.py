"""The VAE stage: conditioning frames to normalised latents, and latents back to pixels.

Latents are normalised with the Wan VAE's per-channel ``latents_mean`` / ``latents_std`` (as
diffusers' Wan pipelines do), so the DiT sees unit-scale latents. Pixels are ``(3, T, H, W)`` in
``[-1, 1]``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch
from diffusers import AutoencoderKLWan


class VAEStage:
    """Encodes images and clips into latents and decodes generated latents.

    Thread-safe: the Wan VAE keeps its causal-convolution cache on the module during a call, so
    calls on one model run one at a time. The stage owns `vae`: with `decode_dtype` (e.g.
    ``torch.bfloat16``) it casts the decoder half (``post_quant_conv``, ``decoder``) to that type and
    encodes in the weights' type; on a GPU it stores the decoder's 3D convolution weights channels-last,
    so cuDNN runs them in NDHWC without transposing each call.
    """

    def __init__(self, vae: AutoencoderKLWan, tiling: bool = False, decode_dtype: torch.dtype | None = None) -> None:
        self.vae = vae
        self.device = next(vae.parameters()).device
        self.dtype = next(vae.parameters()).dtype
        self.decode_dtype = decode_dtype or self.dtype
        vae.post_quant_conv.to(self.decode_dtype)
        vae.decoder.to(self.decode_dtype)
        if self.device.type == "cuda":
            for conv in vae.decoder.modules():
                if isinstance(conv, torch.nn.Conv3d):
                    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
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

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(1, 16, F, h, w)`` -> pixels ``(3, 4(F-1)+1, 8h, 8w)`` in [-1, 1], CPU."""
        return torch.cat(list(self.decode_chunks(latents)), dim=1).cpu()

    def _splits_in_tiles(self, z: torch.Tensor) -> bool:
        """Whether diffusers' tiled decode takes `z` (tiling on and the frame larger than a tile)."""
        vae = self.vae
        tile_h = vae.tile_sample_min_height // vae.spatial_compression_ratio
        tile_w = vae.tile_sample_min_width // vae.spatial_compression_ratio
        return vae.use_tiling and (z.shape[-1] > tile_w or z.shape[-2] > tile_h)

    @torch.no_grad()
    def decode_chunks(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """Decode normalised latents ``(1, 16, F, h, w)`` a latent frame at a time, yielding pixel chunks
        ``(3, t, 8h, 8w)`` in [-1, 1], float32 on the VAE's device, as each is launched: 1 frame, then 4 for
        each later latent. (A consumer that converts them there, `media.frames_to_uint8`, copies a quarter
        of the bytes to the host.)

        The Wan VAE is causal in time: latent frame i decodes from the cache the frames before it left,
        which is the loop of diffusers' ``AutoencoderKLWan._decode``, so a consumer (the MP4 encoder) can
        work on early frames while later ones decode. When tiling splits the frame (or the VAE patchifies)
        the whole video is one chunk from ``vae.decode``. Concatenated, the chunks are ``vae.decode``'s pixels.
        """
        z = (latents.float() * self._std + self._mean).to(self.device, self.decode_dtype)
        vae = self.vae
        with self._lock:  # the causal cache lives on the module until the last chunk
            if self._splits_in_tiles(z) or vae.config.patch_size is not None:
                yield self._pixels(vae.decode(z).sample)
                return
            vae.clear_cache()
            try:
                x = vae.post_quant_conv(z)
                for i in range(x.shape[2]):
                    vae._conv_idx = [0]
                    out = vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                      first_chunk=i == 0)
                    yield self._pixels(out)
            finally:
                vae.clear_cache()

    @staticmethod
    def _pixels(video: torch.Tensor) -> torch.Tensor:
        return video[0].float().clamp(-1, 1)
