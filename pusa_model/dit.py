"""The DiT stage: one VTA denoising step on WanTransformer3DModel, with a combination of LoRAs fused
(the Pusa LoRA, and any of the deployment's registry).

It keeps no request state: latents, schedule and embeddings come with every call (`StepInput`, `run`),
so consecutive steps of one video can run on different replicas.

A two-expert model (Pusa-Wan2.2) has one `DiTStage` per expert, each with its own transformer and its own
`LoraStack`; `DiTExperts` holds them in one process and runs each step on the expert its `StepInput` names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from diffusers import WanTransformer3DModel

from .errors import InvalidRequest
from .lora import LoraFuser, LoraStack
from .loras import PUSA
from .operations import StepInput
from .request_schema import VAE_SPATIAL, VAE_TEMPORAL
from .sampler import Guide, denoise_step, guided_velocity, initial_latents, initial_noise
from .schedule import flow_sigmas
from .text import MAX_SEQUENCE_LENGTH
from .transformer import DiTOptions, apply_options, block_forward, forward_per_frame, select_attention_backend


class DiTStage:
    """Runs denoising steps; `set_loras` fuses a combination of LoRAs (never accumulating).

    `lora` holds the LoRAs (a `LoraStack`, the Pusa LoRA named ``pusa``; a `LoraFuser` is its Pusa LoRA).
    `options` (attention kernel, fused QKV, compile, quantized GEMMs) are applied to `transformer` here, in
    place, after the LoRAs' base weights were taken; None leaves the model as it is. `expert`: which
    transformer of its model this is (0; 1 for a two-expert model's low-noise one): it runs only that
    expert's steps.
    """

    def __init__(
        self, transformer: WanTransformer3DModel, lora: LoraStack | LoraFuser | None = None,
        options: DiTOptions | None = None, expert: int = 0,
    ) -> None:
        self.transformer = transformer
        self.expert = expert
        self.lora: LoraStack | None = lora.stack if isinstance(lora, LoraFuser) else lora
        self.device = next(transformer.parameters()).device
        self.dtype = transformer.patch_embedding.weight.dtype  # some parameters stay float32
        self.options = options
        self._block_fn = block_forward if options is None else apply_options(transformer, options)
        self._attention = None if options is None else options.attention  # the preference the model runs
        self.guide: Guide = guided_velocity  # how the conditional and unconditional passes combine

    @property
    def loras(self) -> dict[str, float] | None:
        """The fused combination (name -> alpha), or None before the first fuse."""
        return None if self.lora is None else self.lora.combination

    @property
    def lora_alpha(self) -> float | None:
        """The Pusa LoRA's fused alpha (None before the first fuse, or without a Pusa LoRA)."""
        return (self.loras or {}).get(PUSA)

    @property
    def fuses(self) -> int:
        """How many times LoRA weights were written."""
        return 0 if self.lora is None else self.lora.fuses

    def set_loras(self, combination: Mapping[str, float]) -> bool:
        """Fuse `combination` (name -> alpha) from the base weights; a no-op when it is fused already.
        The Pusa LoRA is skipped when the preset has none; any other LoRA this stage does not hold is an
        `InvalidRequest` naming ``loras``. Returns whether weights were written."""
        names = self.lora.names if self.lora is not None else ()
        combination = {n: a for n, a in combination.items() if n in names or n != PUSA}
        unknown = sorted(set(combination) - set(names))
        if unknown:
            held = ", ".join(n for n in names if n != PUSA) or "none"
            raise InvalidRequest("loras", f"this DiT holds no LoRA {unknown[0]!r} (it holds: {held})")
        return self.lora is not None and self.lora.fuse(combination)

    def set_lora_alpha(self, alpha: float) -> bool:
        """Fuse the Pusa LoRA alone at `alpha` (`set_loras`)."""
        return self.set_loras({PUSA: alpha})

    def velocity(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The DiT's velocity for float32 latents, with per-frame `timesteps` ``(B, F)``."""
        x = latents.to(self.device, self.dtype)
        text = text.to(self.device, self.dtype)
        out = forward_per_frame(self.transformer, x, timesteps.to(self.device), text, self._block_fn)
        return out.float()

    def use_attention(self, mode: str) -> None:
        """Run the attention kernel that `options` give requests in `mode` (``fast_attention`` for "fast");
        switching re-points the model's attention processors (a compiled DiT compiles once per kernel)."""
        if self.options is None:
            return
        preference = self.options.attention_for(mode)
        if preference != self._attention:
            select_attention_backend(self.transformer, preference)
            self._attention = preference

    @property
    def attention(self) -> str | None:
        """The attention backend the model runs now (diffusers' name), None when not set by options."""
        if self.options is None:
            return None
        processor = self.transformer.blocks[0].attn1.processor
        backend = processor._attention_backend
        return getattr(backend, "value", backend)

    def warm_up(self, width: int, height: int, frames: int, guidance: float = 5.0) -> None:
        """One step on zero inputs at a request's shapes, with each attention kernel the options give a
        request mode: a compiled DiT compiles for them (or loads the kernels from its compile cache) now
        rather than in a user's first step."""
        latent_frames = (frames - 1) // VAE_TEMPORAL + 1
        config = self.transformer.config
        x = torch.zeros(1, config.in_channels, latent_frames, height // VAE_SPATIAL, width // VAE_SPATIAL)
        text = torch.zeros(1, MAX_SEQUENCE_LENGTH, config.text_dim)
        modes = ["standard"] + (["fast"] if self.options is not None and self.options.fast_attention else [])
        for mode in modes:
            self.step(x, 0, flow_sigmas(2), torch.ones(latent_frames), text, text if guidance != 1.0 else None,
                      guidance, mode=mode)

    def stage(self, expert: int) -> DiTStage:
        """The stage that runs `expert`'s steps: this one, when it is that expert."""
        if expert != self.expert:
            raise ValueError(f"a step of expert {expert} sent to the DiT of expert {self.expert}")
        return self

    def run(self, inp: StepInput) -> np.ndarray:
        """The step `inp` (its text resolved) with the LoRAs fused now; step 0 starts from the seed's noise
        and the clean conditioning latents (zeros without conditioning). Returns the next latents."""
        self.stage(inp.expert)
        multipliers = torch.tensor(inp.multipliers)
        if inp.latents is None:
            clean = torch.zeros(inp.shape) if inp.clean is None else torch.from_numpy(inp.clean)
            x = initial_latents(initial_noise(tuple(inp.shape), inp.seed), clean, multipliers)
        else:
            x = torch.from_numpy(inp.latents)
        prompt, negative = (None if t is None else torch.from_numpy(t) for t in inp.text)
        return self.step(x, inp.step, torch.tensor(inp.sigmas), multipliers, prompt, negative, inp.guidance,
                         mode=inp.mode).numpy()

    @torch.no_grad()
    def step(
        self,
        latents: torch.Tensor,
        step: int,
        sigmas: torch.Tensor,
        multipliers: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None,
        guidance: float,
        lora_alpha: float | None = None,
        loras: Mapping[str, float] | None = None,
        mode: str = "standard",
    ) -> torch.Tensor:
        """Step `step` of the schedule `sigmas` from `latents` (with the LoRA combination `loras`, or the
        Pusa LoRA alone at `lora_alpha`, fused first when given; with the attention kernel of request
        `mode`); returns the next latents on the CPU."""
        self.use_attention(mode)
        if loras is not None:
            self.set_loras(loras)
        elif lora_alpha is not None:
            self.set_lora_alpha(lora_alpha)
        x = latents.to(self.device, torch.float32)
        out = denoise_step(
            self.velocity, x, step, sigmas, multipliers, prompt_embeds, negative_embeds, guidance, self.guide
        )
        return out.cpu()


class DiTExperts:
    """The DiT of a two-expert model in one process: a `DiTStage` per expert (``stages[e].expert == e``),
    each with its own transformer and LoRA stack. A step runs on the stage of the expert its `StepInput`
    names, with that expert's guidance; each stage fuses its own expert's LoRA combination."""

    def __init__(self, stages: Sequence[DiTStage]) -> None:
        if [s.expert for s in stages] != list(range(len(stages))):
            raise ValueError(f"stages of experts {[s.expert for s in stages]}, expected 0..{len(stages) - 1} in order")
        self.stages = tuple(stages)

    def stage(self, expert: int) -> DiTStage:
        """The stage of `expert`."""
        return self.stages[expert]

    def run(self, inp: StepInput) -> np.ndarray:
        """The step `inp` on its expert's stage (`DiTStage.run`)."""
        return self.stages[inp.expert].run(inp)

