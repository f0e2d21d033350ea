"""What a user sends for one video: `GenerationRequest`, its fields, defaults and limits, and
nothing else. Neither torch nor Ray: the HTTP client and the command lines read their options from here
(`pusa_model.request_options`); `pusa_model.request` plans a request into a `GenerationPlan`."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .loras import MAX_ALPHA, NAME_PATTERN

WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
    "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, "
    "extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, "
    "fused fingers, still picture, messy background, three legs, many people in the background, "
    "walking backwards"
)

Task = Literal["t2v", "i2v", "multi_frame", "v2v"]
TASKS: tuple[str, ...] = Task.__args__  # type: ignore[attr-defined]

# Noise multipliers used when the request gives none (DESIGN §2.2, from the reference demo).
DEFAULT_I2V_MULTIPLIER = 0.2
DEFAULT_KEYFRAME_MULTIPLIERS = (0.2, 0.5)  # first image, every later image
DEFAULT_COMPLETION_MULTIPLIER = 0.3
DEFAULT_EXTENSION = ((0, 1, 2, 3), (0.0, 0.3, 0.4, 0.5))

VAE_TEMPORAL = 4
VAE_SPATIAL = 8
SIZE_MULTIPLE = 16
MAX_SIDE = 1920
MAX_FRAMES = 1201  # a long video, as a chain of windows; a deployment may set a lower maximum
MAX_WINDOW_FRAMES = 241
OVERLAP_LATENTS = len(DEFAULT_EXTENSION[0])  # latent frames a later window of a long video takes from the one before
OVERLAP_FRAMES = VAE_TEMPORAL * (OVERLAP_LATENTS - 1) + 1  # the pixel frames they encode
PREVIOUS_WINDOW = "window:previous"  # the `video` of a later window's request: the frames of the window before
MAX_LORAS = 4  # LoRAs a request may list beside the Pusa LoRA

# What mode "fast" sets when the request leaves the field out (Pusa's own 4-step scripts: the
# step-distillation LoRA at guidance 1, so no unconditional pass). The LoRA comes from the registry.
FAST_FIELDS = {"steps": 4, "guidance": 1.0}


class LoraChoice(BaseModel):
    """A LoRA of the deployment's registry, fused beside the Pusa LoRA for this request."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(pattern=NAME_PATTERN, description="a name of the deployment's LoRA registry")
    alpha: float | None = Field(default=None, ge=0.0, le=MAX_ALPHA,
                                description="its strength; the registry's default when left out")


class GenerationRequest(BaseModel):
    """One video to generate. Sizes left out take the preset's defaults."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    task: Task = Field(default="t2v", description="t2v, i2v, multi_frame (keyframes) or v2v")
    prompt: str = Field(min_length=1, max_length=4000, description="what the video shows")
    negative_prompt: str = Field(default=WAN_NEGATIVE_PROMPT, max_length=4000,
                                 description="what to steer away from (Wan's negative prompt when left out)")
    images: list[str] = Field(default_factory=list, description="conditioning images (i2v, multi_frame)")
    video: str | None = Field(default=None, description="conditioning video (v2v)")
    v2v_mode: Literal["completion", "extension"] = Field(default="completion",
                                                         description="complete the video, or extend it")
    video_anchor: Literal["start", "end"] = Field(
        default="start", description="condition on the video's first frames, or its last (to continue it)"
    )
    positions: list[int] | None = Field(default=None, description="latent frame index of each conditioning frame, "
                                                                  "e.g. 0,20 (pixel frames with positions_unit pixel)")
    positions_unit: Literal["latent", "pixel"] = Field(default="latent", description="what positions count")
    multipliers: list[float] | None = Field(default=None, description="noise multiplier of each conditioning "
                                                                      "frame, 0 (kept) to 1 (free)")
    noise_multiplier: float | None = Field(default=None, ge=0.0, le=1.0,
                                           description="one noise multiplier for every conditioning frame")
    steps: int = Field(default=10, ge=1, le=50, description="denoising steps")
    guidance: float = Field(default=5.0, ge=1.0, le=20.0,
                            description="classifier-free guidance scale (1: no unconditional pass); on a "
                                        "two-expert model (Wan2.2), the high-noise expert's")
    guidance_2: float | None = Field(default=None, ge=1.0, le=20.0,
                                     description="two-expert models only: the low-noise expert's guidance "
                                                 "(guidance when left out)")
    lora_alpha: float = Field(default=1.4, ge=0.1, le=MAX_ALPHA,
                              description="strength of the Pusa LoRA (when left out, the model's: 1.4; on "
                                          "Wan2.2, the high-noise expert's, 1.5)")
    lora_alpha_2: float | None = Field(default=None, ge=0.1, le=MAX_ALPHA,
                                       description="two-expert models only: the low-noise expert's Pusa LoRA "
                                                   "strength (the model's, 1.4 on Wan2.2, when left out)")
    mode: Literal["standard", "fast"] = Field(
        default="standard", description="fast: 4 steps at guidance 1 with the deployment's distill LoRA, "
                                        "unless the request sets steps, guidance or that LoRA itself")
    loras: list[LoraChoice] = Field(default_factory=list, max_length=MAX_LORAS,
                                    description="LoRAs of the deployment's registry to fuse beside the Pusa LoRA")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="drawn at random when left out")
    width: int | None = Field(default=None, ge=SIZE_MULTIPLE, le=MAX_SIDE,
                              description="a multiple of 16 (the preset's when left out)")
    height: int | None = Field(default=None, ge=SIZE_MULTIPLE, le=MAX_SIDE,
                               description="a multiple of 16 (the preset's when left out)")
    frames: int | None = Field(default=None, ge=1, le=MAX_FRAMES,
                               description="4k+1 (the preset's when left out); more than window_frames makes a "
                                           "long video, a chain of windows")
    window_frames: int | None = Field(default=None, ge=OVERLAP_FRAMES + VAE_TEMPORAL, le=MAX_WINDOW_FRAMES,
                                      description="frames of one window of a long video (the preset's, 81, when left out)")
    extension_multipliers: list[Annotated[float, Field(ge=0.0, le=1.0)]] | None = Field(
        default=None, min_length=OVERLAP_LATENTS, max_length=OVERLAP_LATENTS,
        description="noise multipliers of the latent frames each later window of a long video takes from the "
                    "window before (default 0, 0.3, 0.4, 0.5)")
    fps: int = Field(default=25, ge=1, le=60, description="frames per second of the video")

    @model_validator(mode="before")
    @classmethod
    def _fast_defaults(cls, data):
        """Mode ``fast`` fills the fields of `FAST_FIELDS` the request leaves out."""
        if isinstance(data, dict) and data.get("mode") == "fast":
            data = dict(data)
            for name, value in FAST_FIELDS.items():
                if data.get(name) is None:
                    data[name] = value
        return data

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_from_json(cls, value):
        """A form field carries the list as JSON text."""
        if isinstance(value, (str, bytes)):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("expected a list of {\"name\": ..., \"alpha\": ...} objects (JSON)") from None
        return value
