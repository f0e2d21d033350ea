"""The text encoder stage: UMT5 prompt embeddings exactly as Wan makes them.

Prompt cleaning (ftfy, HTML unescape, whitespace), 512 padded tokens and zeroed embeddings past the
prompt's real length all come from diffusers' `WanPipeline.encode_prompt`, run here with only the
tokenizer and the text encoder loaded.
"""

from __future__ import annotations

import torch
from diffusers import WanPipeline

MAX_SEQUENCE_LENGTH = 512


class TextEncoderStage:
    """Turns a prompt and a negative prompt into embeddings ``(1, 512, text_dim)``."""

    def __init__(self, tokenizer, text_encoder: torch.nn.Module) -> None:
        self._pipe = WanPipeline(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=None, scheduler=None, transformer=None
        )
        self.device = next(text_encoder.parameters()).device

    @torch.no_grad()
    def encode(self, prompt: str, negative_prompt: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings of `prompt` and, when given, of `negative_prompt` (CPU, float32)."""
        positive, negative = self._pipe.encode_prompt(
            prompt,
            negative_prompt,
            do_classifier_free_guidance=negative_prompt is not None,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            device=self.device,
        )
        return positive.float().cpu(), None if negative is None else negative.float().cpu()
