"""What each operation of a plan computes, and `LocalEngine`, which executes them in this process.

The functions here are the operations' work on a stage (encode the conditioning, encode a window's
extension, decode, stitch); the service's VAE deployment calls the same ones on its own stage, and the
DiT's step is `DiTStage.run`. `LocalEngine` runs a plan's operations (all of them for `PusaPipeline.generate`,
a part of them for each of the batch's Ray Data stages) over a `State` that carries what one operation hands
to the next.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import media
from .operations import (DecodeVideo, DecodeWindow, DenoiseStep, EncodeConditioning, EncodeExtension, EncodeText,
                         Operation, StepInput, Stitch)
from .request import GenerationPlan
from .request_schema import OVERLAP_FRAMES
from .schedule import frame_timesteps

if TYPE_CHECKING:  # the stages' modules import diffusers; this one runs on whichever stages it is given
    from .dit import DiTExperts, DiTStage
    from .text import TextEncoderStage
    from .vae import VAEStage


def conditioning_sources(plan: GenerationPlan) -> dict[str, media.Source]:
    """The request's media by field name: ``video``, or ``images[0]``, ``images[1]``, ..."""
    if plan.request.video is not None:
        return {"video": plan.request.video}
    return {f"images[{i}]": src for i, src in enumerate(plan.request.images)}


def conditioning_latents(plan: GenerationPlan, encoded: dict[str, torch.Tensor | list[torch.Tensor]]) -> torch.Tensor:
    """Clean latents ``(1, 16, F, h, w)`` with each conditioning frame at its index (zeros elsewhere).

    `encoded` holds ``images``: one latent frame per image, or ``video``: the encoded clip, whose
    latent i goes to index i.
    """
    clean = torch.zeros(plan.latent_shape)
    for c in plan.conditioning:
        if c.source == "image":
            clean[:, :, c.latent_index] = encoded["images"][c.image_index][:, :, 0]
        else:
            clean[:, :, c.latent_index] = encoded["video"][:, :, c.latent_index]
    return clean


def encode_conditioning(
    vae: VAEStage, plan: GenerationPlan, sources: dict[str, media.Source] | None = None,
    limits: media.MediaLimits = media.DEFAULT_LIMITS,
) -> torch.Tensor:
    """Read, size and VAE-encode the request's conditioning into clean latents (zeros when it has none).

    `sources` maps field names to paths or bytes (default: the request's own paths); `limits` bound what
    decoding them may cost (the deployment's ``api.media``, which admitted them). Unreadable media raise
    `InvalidRequest` naming the field.
    """
    if not plan.conditioning:
        return torch.zeros(plan.latent_shape)
    sources = sources if sources is not None else conditioning_sources(plan)
    if plan.video_frames_needed:
        pixels = media.load_video(
            sources["video"], plan.width, plan.height, plan.video_frames_needed,
            from_end=plan.request.video_anchor == "end", limits=limits,
        )
        return conditioning_latents(plan, {"video": vae.encode(pixels)})
    images = [
        vae.encode(media.load_image(sources[f"images[{i}]"], plan.width, plan.height, field=f"images[{i}]",
                                    limits=limits).unsqueeze(1))
        for i in range(len(plan.request.images))
    ]
    return conditioning_latents(plan, {"images": images})


def encode_extension(vae: VAEStage, plan: GenerationPlan, previous: np.ndarray) -> torch.Tensor:
    """Clean latents of a later window of a long video from the uint8 (T, H, W, 3) frames of the window
    before: its last frames, encoded as the window's first latent frames."""
    pixels = media.frames_to_tensor(previous[-plan.video_frames_needed:])
    return conditioning_latents(plan, {"video": vae.encode(pixels)})


def decode_frames(vae: VAEStage, latents: np.ndarray) -> np.ndarray:
    """A window's uint8 (T, H, W, 3) frames from its latents."""
    return media.frames_to_uint8(vae.decode(torch.from_numpy(latents)))


def stitch_windows(windows: Sequence[np.ndarray]) -> np.ndarray:
    """One video from the uint8 frames of a long video's windows: the first, then each later one after the
    frames it shares with the window before."""
    return np.concatenate([windows[0], *(w[OVERLAP_FRAMES:] for w in windows[1:])])


def stitch_files(windows: Sequence[np.ndarray], fps: int) -> tuple[bytes, bytes]:
    """The bytes of the MP4 and the WebP thumbnail of a long video from its windows' frames."""
    return media.video_files(stitch_windows(windows), fps)


def decode_to_mp4(vae: VAEStage, latents: torch.Tensor, output: Path, fps: int) -> np.ndarray:
    """Decode `latents` into an MP4 at `output`, the encoder working on each chunk of frames while the VAE
    decodes the next (`VAEStage.decode_chunks`, `media.write_mp4_chunks`); returns the uint8 (T, H, W, 3) frames."""
    return media.write_mp4_chunks((media.frames_to_uint8(pixels) for pixels in vae.decode_chunks(latents)), output, fps)


def decode_video_files(vae: VAEStage, latents: torch.Tensor, fps: int) -> tuple[bytes, bytes]:
    """The bytes of the MP4 (`decode_to_mp4`: encoded as the frames decode) and of the WebP thumbnail of
    `latents`."""
    with tempfile.TemporaryDirectory(prefix="pusa-video-") as folder:
        video = Path(folder) / "video.mp4"
        frames = decode_to_mp4(vae, latents, video, fps)
        return video.read_bytes(), media.thumbnail_bytes(frames)


@dataclass(frozen=True)
class StepEvent:
    """Progress of one finished denoising step."""

    step: int  # 0-based, counted over every window of a long video
    total: int
    timesteps: list[float]  # per latent frame
    elapsed_s: float  # since the window's first step
    window: int = 0  # the window of a long video


StepCallback = Callable[[StepEvent], None]


@dataclass
class State:
    """What a plan's operations hand on, in memory (the batch carries it from one stage's pool to the next)."""

    text: tuple[np.ndarray, np.ndarray | None] | None = None  # prompt and negative prompt embeddings
    clean: np.ndarray | None = None  # the window's conditioning, until its first step
    latents: np.ndarray | None = None
    frames: list[np.ndarray] = field(default_factory=list)  # each decoded window of a long video
    files: tuple[bytes, bytes] | None = None  # the video: MP4 and WebP thumbnail


TIMING = {EncodeText: "text", EncodeConditioning: "conditioning", EncodeExtension: "conditioning",
          DenoiseStep: "denoise", DecodeWindow: "decode", DecodeVideo: "decode", Stitch: "write"}


class LocalEngine:
    """Executes operations with the stages of this process (an executor of a part of a plan needs only the
    stages of its operations). `sources` and `limits`: the conditioning's media (default: the request's own
    paths) and what decoding them may cost; `on_step` hears of every step. `dit` is a `DiTStage`, or a
    two-expert model's `DiTExperts`: each step runs on the stage of its `StepInput.expert`, with that
    expert's LoRA combination fused."""

    def __init__(self, text: TextEncoderStage | None = None, vae: VAEStage | None = None,
                 dit: DiTStage | DiTExperts | None = None,
                 sources: dict[str, media.Source] | None = None, limits: media.MediaLimits = media.DEFAULT_LIMITS,
                 on_step: StepCallback | None = None) -> None:
        self.text, self.vae, self.dit = text, vae, dit
        self.sources, self.limits, self.on_step = sources, limits, on_step
        self._window_started = 0.0

    def run(self, plan: GenerationPlan, state: State, ops: Iterable[Operation] | None = None,
            timings: dict[str, float] | None = None) -> State:
        """Execute `ops` (default: all of `plan`'s, in order) on `state`; adds each one's seconds to `timings`
        under its kind (text, conditioning, denoise, decode, write)."""
        for op in plan.operations if ops is None else ops:
            started = time.perf_counter()
            self.execute(plan, op, state)
            if timings is not None:
                timings[TIMING[type(op)]] = timings.get(TIMING[type(op)], 0.0) + time.perf_counter() - started
        return state

    def execute(self, plan: GenerationPlan, op: Operation, state: State) -> None:
        window = plan.windows[getattr(op, "window", 0)]
        if isinstance(op, EncodeText):
            prompt, negative = self.text.encode(*plan.prompts)
            state.text = (prompt.numpy(), None if negative is None else negative.numpy())
        elif isinstance(op, EncodeConditioning):
            state.clean = encode_conditioning(self.vae, window, self.sources, self.limits).numpy()
        elif isinstance(op, EncodeExtension):
            state.clean = encode_extension(self.vae, window, state.frames[op.window - 1]).numpy()
        elif isinstance(op, DenoiseStep):
            self._step(plan, window, op, state)
        elif isinstance(op, DecodeWindow):
            state.frames.append(decode_frames(self.vae, state.latents))
        elif isinstance(op, DecodeVideo):
            state.files = decode_video_files(self.vae, torch.from_numpy(state.latents), plan.request.fps)
        elif isinstance(op, Stitch):
            state.files = stitch_files(state.frames, plan.request.fps)
        else:
            raise TypeError(f"not an operation: {op!r}")

    def _step(self, plan: GenerationPlan, window: GenerationPlan, op: DenoiseStep, state: State) -> None:
        if op.step == 0:
            self._window_started = time.perf_counter()
        inp = StepInput.of(window, op.step, None if op.step == 0 else state.latents, state.clean, state.text)
        stage = self.dit.stage(inp.expert)
        stage.set_loras(plan.lora_combination_of(inp.expert))
        state.latents = stage.run(inp)
        if op.step == 0:
            state.clean = None  # only step 0 reads it
        if self.on_step is not None:
            timesteps = frame_timesteps(window.sigmas, window.multipliers, op.step).tolist()
            self.on_step(StepEvent(op.done - 1, plan.operations.steps, timesteps,
                                   time.perf_counter() - self._window_started, op.window))
