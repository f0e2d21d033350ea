"""TextEncoder deployment: prompt and negative prompt to UMT5 embeddings."""

from __future__ import annotations

import asyncio

import numpy as np
from ray import serve

from pusa_jobs.observability import gpu_kind, job_logging, metrics, timed
from pusa_model.devices import pick_device
from pusa_model.presets import get_preset


@serve.deployment(name="TextEncoder")
class TextEncoder:
    """Loads the preset's tokenizer and text encoder once; encodes prompts on request."""

    def __init__(self, preset: str = "tiny", device: str | None = None, memory_gib: float | None = None) -> None:
        from pusa_model.pipeline import load_text_stage, model_folder  # the model code: in the replica only

        spec = get_preset(preset)
        self.stage = load_text_stage(model_folder(spec), spec, pick_device(device, memory_gib))
        self.tags = {"stage": "text_encode", "deployment": "TextEncoder", "preset": preset, "gpu": gpu_kind()}

    async def encode(self, prompt: str, negative_prompt: str | None,
                     job_id: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Embeddings ``(1, 512, text_dim)`` of the prompt and, when given, the negative prompt."""
        with job_logging(job_id), timed(metrics().stage, **self.tags):
            positive, negative = await asyncio.to_thread(self.stage.encode, prompt, negative_prompt)
        return positive.numpy(), None if negative is None else negative.numpy()
