"""The whole request in one process: text -> conditioning -> VTA denoising -> decode -> MP4.

The service runs the same stages as separate deployments; this module is the reference composition
and the CLI's engine.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import media
from .dit import DiTStage
from .transformer import DiTOptions
from .loading import fill_once, load_components, resolve_source
from .lora import LoraStack, SafetensorsWeights, load_lora_state_dict
from .loras import PUSA, LoraRegistry, lora_path
from .presets import TINY_SEED, Preset, build_tiny_checkpoint, get_preset
from .request import OVERLAP_FRAMES, GenerationPlan
from .sampler import initial_latents, initial_noise
from .schedule import frame_timesteps
from .text import TextEncoderStage
from .vae import VAEStage


@dataclass(frozen=True)
class StepEvent:
    """Progress of one finished denoising step."""

    step: int  # 0-based, counted over every window of a long video
    total: int
    timesteps: list[float]  # per latent frame
    elapsed_s: float
    window: int = 0  # the window of a long video


StepCallback = Callable[[StepEvent], None]


@dataclass
class GenerationResult:
    video_path: Path
    thumbnail_path: Path
    plan: GenerationPlan
    timings_s: dict[str, float] = field(default_factory=dict)


def _build_tiny(folder: Path) -> dict:
    build_tiny_checkpoint(folder)
    return {"preset": "tiny", "seed": TINY_SEED}


def model_folder(preset: Preset) -> Path:
    """Local folder of `preset`'s checkpoint: built for `tiny`, copied once for ``s3://``."""
    if preset.name == "tiny":
        return fill_once(Path(preset.source), _build_tiny)
    return resolve_source(preset.source)


LORA_BASES = ("disk", "cpu", "device")


def load_dit_stage(
    folder: Path, preset: Preset, device: str, options: DiTOptions | None = None,
    loras: LoraRegistry | None = None, lora_base: str = "disk",
) -> DiTStage:
    """The DiT with the preset's LoRA (``pusa``) and the registry's `loras` ready to fuse in any combination,
    and the speed `options` applied. Base weights for re-fusing: `lora_base` ``disk`` re-reads them from the
    checkpoint (no memory kept), ``cpu`` keeps a copy of every targeted weight in host memory, ``device`` keeps
    it beside the model together with the LoRAs' tensors (fastest switches; as much device memory again as
    the targeted weights, plus the LoRAs)."""
    if lora_base not in LORA_BASES:
        raise ValueError(f"lora_base must be one of {LORA_BASES}, got {lora_base!r}")
    transformer = load_components(folder, preset.torch_dtype, device, parts=("transformer",)).transformer
    states = {}
    if preset.lora:
        states[PUSA] = load_lora_state_dict(folder / preset.lora)
    for name, entry in (loras.root if loras is not None else {}).items():
        states[name] = load_lora_state_dict(lora_path(entry.path, folder))
    stack = None
    if states:
        if lora_base == "disk":
            stack = LoraStack(transformer, states, base_weights=SafetensorsWeights(folder / "transformer"))
        else:
            on_device = lora_base == "device"
            stack = LoraStack(transformer, states, base_device=device if on_device else "cpu",
                              lora_device=device if on_device else None)
    return DiTStage(transformer, stack, options)


def load_text_stage(folder: Path, preset: Preset, device: str) -> TextEncoderStage:
    parts = load_components(folder, preset.torch_dtype, device, parts=("tokenizer", "text_encoder"))
    return TextEncoderStage(parts.tokenizer, parts.text_encoder)


def load_vae_stage(folder: Path, preset: Preset, device: str, tiling: bool = False,
                   decode_dtype: str | None = None) -> VAEStage:
    """The preset's VAE (float32, as diffusers' Wan pipelines run it); `decode_dtype` e.g. "bfloat16"
    casts its decoder to that type (`VAEStage`)."""
    vae = load_components(folder, preset.torch_dtype, device, parts=("vae",)).vae
    return VAEStage(vae, tiling=tiling, decode_dtype=getattr(torch, decode_dtype) if decode_dtype else None)


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
    """Read, size and VAE-encode the request's conditioning into clean latents.

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


def stitch_windows(windows: Sequence[np.ndarray]) -> np.ndarray:
    """One video from the uint8 frames of a long video's windows: the first, then each later one after the
    frames it shares with the window before."""
    return np.concatenate([windows[0], *(w[OVERLAP_FRAMES:] for w in windows[1:])])


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


class PusaPipeline:
    """Text encoder, VAE and DiT of one preset in this process."""

    def __init__(self, preset: Preset, text: TextEncoderStage, vae: VAEStage, dit: DiTStage) -> None:
        self.preset = preset
        self.text = text
        self.vae = vae
        self.dit = dit

    @classmethod
    def from_preset(
        cls, name: str, device: str | None = None, dit_options: DiTOptions | None = None,
        loras: LoraRegistry | None = None, lora_base: str = "disk",
    ) -> "PusaPipeline":
        """The preset's three stages on `device`; the DiT also holds the registry's `loras`."""
        preset = get_preset(name)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        folder = model_folder(preset)
        return cls(
            preset,
            load_text_stage(folder, preset, device),
            load_vae_stage(folder, preset, device),
            load_dit_stage(folder, preset, device, dit_options, loras, lora_base),
        )

    def denoise(
        self, plan: GenerationPlan, clean: torch.Tensor, prompt: torch.Tensor, negative: torch.Tensor | None,
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        """Run every VTA step from the seed's noise; returns the final latents."""
        req = plan.request
        sigmas, multipliers = plan.sigmas, plan.multipliers
        latents = initial_latents(initial_noise(plan.latent_shape, plan.seed), clean, multipliers)
        start = time.perf_counter()
        for k in range(req.steps):
            latents = self.dit.step(
                latents, k, sigmas, multipliers, prompt, negative, req.guidance, loras=plan.lora_combination,
                mode=req.mode,
            )
            if on_step is not None:
                timesteps = frame_timesteps(sigmas, multipliers, k).tolist()
                on_step(StepEvent(k, req.steps, timesteps, time.perf_counter() - start))
        return latents

    def generate(self, plan: GenerationPlan, output: Path, on_step: StepCallback | None = None) -> GenerationResult:
        """Generate the planned video (a long one window by window); write ``output`` (MP4) and a WebP
        thumbnail beside it. ``timings_s``: text, conditioning, denoise, decode (with the MP4's encoding for
        a video of one window, which runs while it decodes) and write (the rest of the files)."""
        req, windows = plan.request, plan.windows
        timings: dict[str, float] = defaultdict(float)
        t0 = time.perf_counter()
        negative_prompt = req.negative_prompt if req.guidance != 1.0 else None
        prompt, negative = self.text.encode(req.prompt, negative_prompt)
        timings["text"] = time.perf_counter() - t0
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        thumbnail = output.with_suffix(".webp")
        pieces: list[np.ndarray] = []
        for i, window in enumerate(windows):
            t1 = time.perf_counter()
            clean = encode_conditioning(self.vae, window) if i == 0 else encode_extension(self.vae, window, pieces[-1])
            t2 = time.perf_counter()
            steps = window.request.steps
            on_window_step = None if on_step is None else (
                lambda event, i=i: on_step(replace(event, step=i * steps + event.step, total=steps * len(windows),
                                                   window=i)))
            latents = self.denoise(window, clean, prompt, negative, on_window_step)
            t3 = time.perf_counter()
            timings["conditioning"] += t2 - t1
            timings["denoise"] += t3 - t2
            if len(windows) == 1:  # the MP4 is encoded while the frames decode: "decode" includes it
                pieces.append(decode_to_mp4(self.vae, latents, output, req.fps))
            else:
                pieces.append(media.frames_to_uint8(self.vae.decode(latents)))
            timings["decode"] += time.perf_counter() - t3
        t4 = time.perf_counter()
        frames = stitch_windows(pieces)
        if len(windows) > 1:
            media.write_mp4(frames, output, req.fps)
        media.write_thumbnail(frames, thumbnail)
        timings["write"] = time.perf_counter() - t4
        return GenerationResult(output, thumbnail, plan, dict(timings))
