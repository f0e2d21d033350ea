"""The whole request in one process: the plan's operations (`pusa_model.operations`) executed by
`engine.LocalEngine` over the three stages loaded here. The CLI's engine; the service and the batch
execute the same operations with their own executors.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .dit import DiTExperts, DiTStage
from .errors import ConfigError
from .engine import LocalEngine, State, StepCallback
from .transformer import DiTOptions
from .loading import fill_once, load_components, resolve_source
from .lora import LoraStack, SafetensorsWeights, load_lora_state_dict
from .loras import PUSA, LoraRegistry, lora_path
from .presets import TINY_SEED, Preset, build_tiny_checkpoint, build_tiny_wan22_checkpoint, get_preset
from .request import GenerationPlan
from .text import TextEncoderStage
from .vae import VAEStage


@dataclass
class GenerationResult:
    video_path: Path
    thumbnail_path: Path
    plan: GenerationPlan
    timings_s: dict[str, float] = field(default_factory=dict)


def _build_tiny(folder: Path) -> dict:
    build_tiny_checkpoint(folder)
    return {"preset": "tiny", "seed": TINY_SEED}


def _build_tiny_wan22(folder: Path) -> dict:
    build_tiny_wan22_checkpoint(folder)
    return {"preset": "tiny-wan2.2", "seed": TINY_SEED}


def model_folder(preset: Preset) -> Path:
    """Local folder of `preset`'s checkpoint: built for `tiny` and `tiny-wan2.2`, copied once for ``s3://``."""
    if preset.name == "tiny":
        return fill_once(Path(preset.source), _build_tiny)
    if preset.name == "tiny-wan2.2":
        return fill_once(Path(preset.source), _build_tiny_wan22)
    return resolve_source(preset.source)


LORA_BASES = ("disk", "cpu", "device")


def load_dit_stage(
    folder: Path, preset: Preset, device: str, options: DiTOptions | None = None,
    loras: LoraRegistry | None = None, lora_base: str = "disk", expert: int | None = None,
) -> DiTStage | DiTExperts:
    """The DiT with the preset's LoRA (``pusa``) and the registry's `loras` ready to fuse in any combination,
    and the speed `options` applied. Base weights for re-fusing: `lora_base` ``disk`` re-reads them from the
    checkpoint (no memory kept), ``cpu`` keeps a copy of every targeted weight in host memory, ``device`` keeps
    it beside the model together with the LoRAs' tensors (fastest switches; as much device memory again as
    the targeted weights, plus the LoRAs).

    A two-expert preset gives a `DiTExperts` of both experts, or with `expert` (0 or 1) that expert's
    `DiTStage` alone: its transformer folder, its Pusa LoRA file and each registry entry's file for it
    (``path``, or ``path_2`` for the low-noise expert)."""
    if lora_base not in LORA_BASES:
        raise ValueError(f"lora_base must be one of {LORA_BASES}, got {lora_base!r}")
    if expert is None and preset.experts > 1:
        return DiTExperts([load_dit_stage(folder, preset, device, options, loras, lora_base, e)
                           for e in range(preset.experts)])
    expert = expert or 0
    if not 0 <= expert < preset.experts:
        raise ValueError(f"preset {preset.name} has no expert {expert} (it has {preset.experts})")
    part = preset.transformers[expert]
    transformer = getattr(load_components(folder, preset.torch_dtype, device, parts=(part,)), part)
    states = {}
    if preset.loras[expert]:
        states[PUSA] = load_lora_state_dict(folder / preset.loras[expert])
    for name, entry in (loras.root if loras is not None else {}).items():
        if (entry.path_2 is not None) != (preset.experts > 1):
            raise ConfigError(f"LoRA {name!r}: a two-expert model needs a file per expert (path and path_2), a "
                              f"one-expert model one file (path); preset {preset.name} has {preset.experts}")
        states[name] = load_lora_state_dict(lora_path(entry.path_2 if expert else entry.path, folder))
    stack = None
    if states:
        if lora_base == "disk":
            stack = LoraStack(transformer, states, base_weights=SafetensorsWeights(folder / part))
        else:
            on_device = lora_base == "device"
            stack = LoraStack(transformer, states, base_device=device if on_device else "cpu",
                              lora_device=device if on_device else None)
    return DiTStage(transformer, stack, options, expert=expert)


def load_text_stage(folder: Path, preset: Preset, device: str) -> TextEncoderStage:
    parts = load_components(folder, preset.torch_dtype, device, parts=("tokenizer", "text_encoder"))
    return TextEncoderStage(parts.tokenizer, parts.text_encoder)


def load_vae_stage(folder: Path, preset: Preset, device: str, tiling: bool = False,
                   decode_dtype: str | None = None) -> VAEStage:
    """The preset's VAE (float32, as diffusers' Wan pipelines run it); `decode_dtype` e.g. "bfloat16"
    casts its decoder to that type (`VAEStage`)."""
    vae = load_components(folder, preset.torch_dtype, device, parts=("vae",)).vae
    return VAEStage(vae, tiling=tiling, decode_dtype=getattr(torch, decode_dtype) if decode_dtype else None)


class PusaPipeline:
    """Text encoder, VAE and DiT of one preset in this process (`dit`: a two-expert preset's `DiTExperts`)."""

    def __init__(self, preset: Preset, text: TextEncoderStage, vae: VAEStage, dit: DiTStage | DiTExperts) -> None:
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
        self, plan: GenerationPlan, clean: torch.Tensor | None, prompt: torch.Tensor, negative: torch.Tensor | None,
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        """The steps of `plan`, a plan of one window, from the seed's noise and the `clean` conditioning latents
        (None: none); returns the final latents."""
        state = State(text=(prompt.numpy(), None if negative is None else negative.numpy()),
                      clean=None if clean is None else clean.numpy())
        ops = plan.operations
        LocalEngine(dit=self.dit, on_step=on_step).run(plan, state, ops[ops.denoising])
        return torch.from_numpy(state.latents)

    def generate(self, plan: GenerationPlan, output: Path, on_step: StepCallback | None = None) -> GenerationResult:
        """Generate the planned video (`plan.operations`, a long one window by window); write ``output`` (MP4)
        and a WebP thumbnail beside it. ``timings_s``: text, conditioning, denoise, decode (with the MP4's
        encoding for a video of one window, which runs while it decodes) and write (the rest)."""
        timings: dict[str, float] = defaultdict(float)
        engine = LocalEngine(self.text, self.vae, self.dit, on_step=on_step)
        video, thumbnail_bytes = engine.run(plan, State(), timings=timings).files
        started = time.perf_counter()
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        thumbnail = output.with_suffix(".webp")
        output.write_bytes(video)
        thumbnail.write_bytes(thumbnail_bytes)
        timings["write"] += time.perf_counter() - started
        return GenerationResult(output, thumbnail, plan, dict(timings))
