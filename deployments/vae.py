"""VAE deployment: the VAE's operations of a job's plan (`pusa_model.operations`): encode its conditioning
media or a long video's extension, decode a window, decode or stitch the video, each given the window's plan
by the runner (no re-planning here).

Media bytes come from and go to the shared store, so they never pass through the router or the runner.
"""

from __future__ import annotations

import asyncio
from typing import Literal

import numpy as np
import torch
from ray import serve

from pusa_jobs.job_files import JobFiles
from pusa_jobs.observability import gpu_kind, job_logging, metrics, timed
from pusa_jobs.storage import open_store
from pusa_model import media
from pusa_model.devices import pick_device, release_on_oom
from pusa_model.engine import decode_frames, decode_video_files, encode_conditioning, encode_extension, stitch_files
from pusa_model.presets import get_preset
from pusa_model.request import GenerationPlan


@serve.deployment(name="VAE")
class VAE:
    """Loads the preset's VAE once (tiled when configured; decoding in `decode_dtype` when set)."""

    def __init__(self, preset: str = "tiny", store: str = "data", device: str | None = None, tiling: bool = False,
                 decode_dtype: Literal["bfloat16", "float16"] | None = None, memory_gib: float | None = None,
                 media_limits: dict | None = None) -> None:
        from pusa_model.pipeline import load_vae_stage, model_folder  # the model code: in the replica only

        self.media_limits = media.MediaLimits.model_validate(media_limits or {})  # the Router's api.media
        spec = get_preset(preset)
        self.stage = load_vae_stage(model_folder(spec), spec, pick_device(device, memory_gib), tiling=tiling,
                                    decode_dtype=decode_dtype)
        self.files = JobFiles(open_store(store))
        self.tags = {"deployment": "VAE", "preset": preset, "gpu": gpu_kind()}

    def _encode(self, plan: GenerationPlan, inputs: dict[str, str]) -> np.ndarray:
        sources = {field: self.files.store.get(key) for field, key in inputs.items()}
        return encode_conditioning(self.stage, plan, sources, self.media_limits).numpy()

    def _encode_extension(self, plan: GenerationPlan, previous_key: str) -> np.ndarray:
        return encode_extension(self.stage, plan, self.files.get_checkpoint(previous_key)).numpy()

    async def encode_extension(self, plan: GenerationPlan, previous_key: str, job_id: str | None = None
                               ) -> np.ndarray:
        """Clean latents of `plan`, a later window of a long video, from the stored frames of the window before."""
        with job_logging(job_id), timed(metrics().stage, stage="conditioning_encode", **self.tags):
            return await asyncio.to_thread(self._encode_extension, plan, previous_key)

    async def encode_conditioning(self, plan: GenerationPlan, inputs: dict[str, str],
                                  job_id: str | None = None) -> np.ndarray:
        """Clean latents ``(1, 16, F, h, w)`` of `plan` with the job's images or clip at their latent indices."""
        with job_logging(job_id), timed(metrics().stage, stage="conditioning_encode", **self.tags):
            return await asyncio.to_thread(self._encode, plan, inputs)

    def _decode(self, job_id: str, latents: np.ndarray, fps: int) -> dict[str, str]:
        with timed(metrics().stage, stage="decode", **self.tags):  # the MP4 encodes as the frames decode
            files = decode_video_files(self.stage, torch.from_numpy(latents), fps)
        with timed(metrics().stage, stage="write", **self.tags):
            return self.files.put_result(job_id, *files)

    async def decode_to_store(self, job_id: str, latents: np.ndarray, fps: int) -> dict[str, str]:
        """Decode final latents, write the MP4 and thumbnail to the store; returns their keys."""
        with job_logging(job_id):
            return await asyncio.to_thread(release_on_oom, self._decode, job_id, latents, fps)

    def _decode_window(self, job_id: str, window: int, latents: np.ndarray, fps: int) -> str:
        with timed(metrics().stage, stage="decode", **self.tags):
            frames = decode_frames(self.stage, latents)
        with timed(metrics().stage, stage="write", **self.tags):
            return self.files.put_window(job_id, window, media.mp4_bytes(frames, fps), frames)

    async def decode_window_to_store(self, job_id: str, window: int, latents: np.ndarray, fps: int) -> str:
        """Decode window `window` of a long video; store its frames and its MP4 (whose key it returns)."""
        with job_logging(job_id):
            return await asyncio.to_thread(self._decode_window, job_id, window, latents, fps)

    def _stitch(self, job_id: str, windows: int, fps: int) -> dict[str, str]:
        pieces = [self.files.get_checkpoint(self.files.window_frames_key(job_id, i)) for i in range(windows)]
        with timed(metrics().stage, stage="write", **self.tags):
            return self.files.put_result(job_id, *stitch_files(pieces, fps))

    async def stitch_to_store(self, job_id: str, windows: int, fps: int) -> dict[str, str]:
        """Write a long video's MP4 and thumbnail from its stored windows; returns their keys."""
        with job_logging(job_id):
            return await asyncio.to_thread(self._stitch, job_id, windows, fps)
