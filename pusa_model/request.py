"""Generation requests: the parameters of every task, their defaults and their checks.

`GenerationRequest` (`pusa_model.request_schema`) is what a user sends (CLI flags, HTTP JSON, a batch
row). `plan_request` checks it against
itself and the preset's defaults and resolves it into a `GenerationPlan`: concrete sizes, the latent
index and noise multiplier of every conditioning frame, and the sampling schedule. Every rejection
is an `InvalidRequest` naming the field.

Positions are latent frame indices (``0 .. F-1``, ``F = (frames - 1) / 4 + 1``); with
``positions_unit="pixel"`` they are pixel frame indices, mapped to latent ``(p + 3) // 4``.

A request for more frames than one window (``window_frames``, the preset's, 81, by default) is a long
video: a chain of windows. Window 0 is the request itself at the window's length; each later window is a
v2v extension conditioned on the last `OVERLAP_FRAMES` frames of the window before (its first
`OVERLAP_LATENTS` latent frames, noise multipliers ``extension_multipliers``, the reference demo's
extension defaults when left out) with its own seed (the request's plus its index), and the last window
is shortened to end at ``frames``. The video is window 0 followed by each later window after its overlap.

On a two-expert model (the preset has a `boundary`, e.g. Pusa-Wan2.2) the plan says which expert runs each
step (`GenerationPlan.expert`: by the step's own timestep against the boundary) with its guidance and its
LoRA combination; `plan_request` fills the request's per-expert fields the request leaves out (`resolve_experts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch
from pydantic import ValidationError

from .errors import InvalidRequest
from .loras import PUSA, LoraRegistry
from .operations import Operations, plan_operations
from .presets import Preset, get_preset
from .request_schema import (DEFAULT_COMPLETION_MULTIPLIER, DEFAULT_EXTENSION, DEFAULT_I2V_MULTIPLIER,
                             DEFAULT_KEYFRAME_MULTIPLIERS, OVERLAP_FRAMES, PREVIOUS_WINDOW, SIZE_MULTIPLE, VAE_SPATIAL,
                             VAE_TEMPORAL, GenerationRequest, LoraChoice)
from .schedule import flow_sigmas, frame_sigma_deltas, frame_timesteps, step_expert

@dataclass(frozen=True)
class ConditioningFrame:
    """A latent frame fixed by the input: `source` is ``image`` (index into images) or ``video``."""

    latent_index: int
    multiplier: float
    source: Literal["image", "video"]
    image_index: int | None = None


@dataclass(frozen=True)
class GenerationPlan:
    """A checked request resolved to numbers the model runs on."""

    request: GenerationRequest
    width: int
    height: int
    frames: int
    seed: int
    conditioning: tuple[ConditioningFrame, ...]  # a long video's: its first window's
    window_frames: int | None = None  # set when the request is a long video (frames > window_frames)
    boundary: float | None = None  # a two-expert model's (the preset's); None: one expert

    @cached_property
    def windows(self) -> tuple[GenerationPlan, ...]:
        """The plan of every window this request runs as: itself, or a long video's chain. A window's
        request plans as that window alone (its frames, its seed)."""
        if self.window_frames is None:
            return (self,)
        extension = dict(task="v2v", v2v_mode="extension", video_anchor="end", video=PREVIOUS_WINDOW, images=[],
                         positions=None, positions_unit="latent", multipliers=self.request.extension_multipliers,
                         noise_multiplier=None)
        plans = []
        for i, frames in enumerate(window_frame_counts(self.frames, self.window_frames)):
            seed = (self.seed + i) % 2**63
            req = self.request.model_copy(update={**(extension if i else {}), "frames": frames,
                                                  "window_frames": frames, "seed": seed})
            plans.append(_plan_window(req, self.width, self.height, frames, seed, self.boundary))
        return tuple(plans)

    @cached_property
    def operations(self) -> Operations:
        """The ordered operations that make this video (`pusa_model.operations`)."""
        return plan_operations(self)

    @property
    def prompts(self) -> tuple[str, str | None]:
        """The prompt and the negative prompt the text encoder encodes (None when no expert guides: no
        unconditional pass)."""
        guided = any(g != 1.0 for g in self.guidances)
        return self.request.prompt, self.request.negative_prompt if guided else None

    @property
    def experts(self) -> int:
        """How many transformers the model has: 1, or 2 (high noise, low noise) with a `boundary`."""
        return 1 if self.boundary is None else 2

    def expert(self, step: int) -> int:
        """The expert that runs step `step`: by the step's scheduler timestep ``1000 * sigma_step`` against the
        boundary (`schedule.step_expert`), whatever the frames' own scaled timesteps; 0 with one expert."""
        return step_expert(float(self.sigmas[step]), self.boundary)

    @property
    def guidances(self) -> tuple[float, ...]:
        """Each expert's guidance: ``guidance``, and on a two-expert model ``guidance_2`` (resolved)."""
        req = self.request
        return (req.guidance,) if self.experts == 1 else (req.guidance, req.guidance_2)

    def guidance_at(self, step: int) -> float:
        """The guidance of step `step`: its expert's."""
        return self.guidances[self.expert(step)]

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // VAE_TEMPORAL + 1

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        return (1, 16, self.latent_frames, self.height // VAE_SPATIAL, self.width // VAE_SPATIAL)

    @property
    def video_frames_needed(self) -> int:
        """Pixel frames of the input video that v2v encodes: up to the last conditioned latent."""
        last = max((c.latent_index for c in self.conditioning if c.source == "video"), default=-1)
        return VAE_TEMPORAL * last + 1 if last >= 0 else 0

    @property
    def sigmas(self) -> torch.Tensor:
        return flow_sigmas(self.request.steps)

    @property
    def lora_combination(self) -> dict[str, float]:
        """The LoRAs the DiT fuses for this request, name -> alpha: the Pusa LoRA at ``lora_alpha`` and
        every listed LoRA of non-zero alpha (the request was resolved against the registry). On a two-expert
        model, the high-noise expert's (`lora_combination_of`)."""
        return self.lora_combination_of(0)

    def lora_combination_of(self, expert: int) -> dict[str, float]:
        """The LoRA combination `expert` runs with: its Pusa LoRA at its alpha (``lora_alpha``, or
        ``lora_alpha_2`` for the low-noise expert) and every listed LoRA, whose file for that expert the
        deployment holds, at the one alpha the request gives it."""
        combination = {PUSA: self.request.lora_alpha if expert == 0 else self.request.lora_alpha_2}
        for i, choice in enumerate(self.request.loras):
            if choice.alpha is None:
                raise InvalidRequest(f"loras[{i}].alpha", "no alpha given and no LoRA registry to default it from")
            if choice.alpha:
                combination[choice.name] = choice.alpha
        return combination

    @property
    def multipliers(self) -> torch.Tensor:
        """Noise multiplier of every latent frame ``(F,)``: 1 for free frames."""
        m = torch.ones(self.latent_frames)
        for c in self.conditioning:
            m[c.latent_index] = c.multiplier
        return m

    def describe(self) -> dict:
        """The plan as JSON-ready data: sizes, conditioning and every step's per-frame schedule."""
        sigmas, m = self.sigmas, self.multipliers
        steps = [
            {
                "step": k,
                "timesteps": [round(v, 4) for v in frame_timesteps(sigmas, m, k).tolist()],
                "sigma": round(float(sigmas[k]), 6),
                "sigma_next": round(float(sigmas[k + 1]), 6),
                "frame_sigma_deltas": [round(v, 6) for v in frame_sigma_deltas(sigmas, m, k).tolist()],
                **({"expert": self.expert(k), "guidance": self.guidance_at(k)} if self.experts > 1 else {}),
            }
            for k in range(self.request.steps)
        ]
        experts = ({"boundary": self.boundary, "guidance_2": self.request.guidance_2,
                    "lora_alpha_2": self.request.lora_alpha_2} if self.experts > 1 else {})
        if self.window_frames is not None:
            windows = self.windows
            return {**windows[0].describe(), "frames": self.frames, "window_frames": self.window_frames,
                    "windows": [{"frames": w.frames, "new_frames": w.frames - (OVERLAP_FRAMES if i else 0),
                                 "seed": w.seed, "conditioning": [c.__dict__ for c in w.conditioning]}
                                for i, w in enumerate(windows)]}
        return {
            "task": self.request.task,
            "width": self.width,
            "height": self.height,
            "frames": self.frames,
            "fps": self.request.fps,
            "latent_frames": self.latent_frames,
            "latent_shape": list(self.latent_shape),
            "seed": self.seed,
            "guidance": self.request.guidance,
            "lora_alpha": self.request.lora_alpha,
            "mode": self.request.mode,
            "loras": [choice.model_dump() for choice in self.request.loras],
            **experts,
            "cfg_passes_per_step": 1 if all(g == 1.0 for g in self.guidances) else 2,  # at most, over the steps
            "conditioning": [c.__dict__ for c in self.conditioning],
            "video_frames_needed": self.video_frames_needed,
            "steps": steps,
        }


def parse_request(data: dict) -> GenerationRequest:
    """Build a request from plain data; type and range errors become `InvalidRequest`."""
    try:
        return GenerationRequest.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"]) or "request"
        raise InvalidRequest(field, error["msg"]) from None


def _check_size(field: str, value: int) -> None:
    if value % SIZE_MULTIPLE:
        raise InvalidRequest(field, f"{value} is not a multiple of {SIZE_MULTIPLE}")


def _latent_positions(req: GenerationRequest, latent_frames: int, frames: int) -> list[int] | None:
    if req.positions is None:
        return None
    if not req.positions:
        raise InvalidRequest("positions", "is empty; leave it out for the task's default")
    if req.positions_unit == "pixel":
        for p in req.positions:
            if not 0 <= p < frames:
                raise InvalidRequest("positions", f"pixel frame {p} is outside 0..{frames - 1}")
        latent = [(p + 3) // VAE_TEMPORAL for p in req.positions]
    else:
        latent = list(req.positions)
        for p in latent:
            if not 0 <= p < latent_frames:
                raise InvalidRequest("positions", f"latent frame {p} is outside 0..{latent_frames - 1}")
    if len(set(latent)) != len(latent):
        dup = next(p for p in latent if latent.count(p) > 1)
        raise InvalidRequest("positions", f"latent frame {dup} is given more than once")
    return latent


def _default_positions(req: GenerationRequest, latent_frames: int) -> list[int]:
    if req.task == "i2v":
        return [0]
    if req.task == "v2v" and req.v2v_mode == "extension":
        positions = list(DEFAULT_EXTENSION[0])
        if positions[-1] >= latent_frames:
            raise InvalidRequest("frames", f"extension needs at least {positions[-1] + 1} latent frames")
        return positions
    count = len(req.images) if req.task == "multi_frame" else 2  # keyframes, or completion's first and last
    if latent_frames < count:
        raise InvalidRequest("frames", f"{count} conditioning frames need at least {count} latent frames")
    return [round(i * (latent_frames - 1) / (count - 1)) for i in range(count)]


def _default_multipliers(req: GenerationRequest, count: int, positions_given: bool) -> list[float]:
    if req.noise_multiplier is not None:
        return [req.noise_multiplier] * count
    if req.task == "i2v":
        return [DEFAULT_I2V_MULTIPLIER]
    if req.task == "multi_frame":
        first, rest = DEFAULT_KEYFRAME_MULTIPLIERS
        return [first] + [rest] * (count - 1)
    if req.v2v_mode == "extension" and not positions_given:
        return list(DEFAULT_EXTENSION[1])
    return [DEFAULT_COMPLETION_MULTIPLIER] * count


def resolve_loras(req: GenerationRequest, registry: LoraRegistry) -> GenerationRequest:
    """`req` with its LoRAs checked against `registry` and their alphas filled in (the registry's default
    where left out), and in mode ``fast`` the registry's fast LoRA added when the request does not list it."""
    chosen: list[LoraChoice] = []
    for i, choice in enumerate(req.loras):
        field = f"loras[{i}].name"
        if choice.name == PUSA:
            raise InvalidRequest(field, f"{PUSA!r} is the Pusa LoRA: set its strength with lora_alpha")
        if any(c.name == choice.name for c in chosen):
            raise InvalidRequest(field, f"LoRA {choice.name!r} is listed twice")
        entry = registry.get(choice.name)
        if entry is None:
            known = ", ".join(sorted(registry)) or "none"
            raise InvalidRequest(field, f"unknown LoRA {choice.name!r} (this deployment has: {known})")
        chosen.append(LoraChoice(name=choice.name, alpha=entry.alpha if choice.alpha is None else choice.alpha))
    fast = registry.fast
    if req.mode == "fast" and fast is not None and all(c.name != fast for c in chosen):
        chosen.append(LoraChoice(name=fast, alpha=registry.get(fast).alpha))
    return req.model_copy(update={"loras": chosen})


def resolve_experts(req: GenerationRequest, preset: Preset) -> GenerationRequest:
    """`req` with the per-model fields it leaves out filled from `preset`: ``lora_alpha`` (the preset's, the
    high-noise expert's on a two-expert model) and, on a two-expert model, ``lora_alpha_2`` (the preset's
    low-noise alpha) and ``guidance_2`` (``guidance``, as diffusers' ``guidance_scale_2``). A one-expert
    model refuses ``guidance_2`` and ``lora_alpha_2``."""
    update: dict = {}
    if "lora_alpha" not in req.model_fields_set:
        update["lora_alpha"] = preset.lora_alpha
    if preset.experts == 1:
        for name in ("guidance_2", "lora_alpha_2"):
            if getattr(req, name) is not None:
                raise InvalidRequest(name, f"model {preset.name} has one transformer; {name} is for two-expert "
                                           "models (Wan2.2)")
    else:
        if req.lora_alpha_2 is None:
            update["lora_alpha_2"] = preset.lora_alpha_2
        if req.guidance_2 is None:
            update["guidance_2"] = req.guidance
    return req.model_copy(update=update) if update else req


def window_frame_counts(frames: int, window: int) -> list[int]:
    """The frames of each window of a long video of `frames` frames in windows of `window` (both 4k+1):
    full windows, the last one shortened; each after the first adds all but its `OVERLAP_FRAMES`."""
    counts = [window]
    while (made := window + sum(c - OVERLAP_FRAMES for c in counts[1:])) < frames:
        counts.append(min(window, frames - made + OVERLAP_FRAMES))
    return counts


def plan_request(
    req: GenerationRequest, preset: Preset, default_seed: int | None = None, loras: LoraRegistry | None = None
) -> GenerationPlan:
    """Check `req` and resolve it against `preset`'s defaults and the LoRA registry `loras` (None: the
    request was resolved before, e.g. a stored job's). Raises `InvalidRequest`."""
    if loras is not None:
        req = resolve_loras(req, loras)
    req = resolve_experts(req, preset)
    width = req.width or preset.width
    height = req.height or preset.height
    frames = req.frames or preset.frames
    window = req.window_frames or preset.window_frames
    seed = req.seed if req.seed is not None else default_seed
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    if frames > window:
        if (window - 1) % VAE_TEMPORAL or window < OVERLAP_FRAMES + VAE_TEMPORAL:
            raise InvalidRequest("window_frames", f"a window of a long video must have 4k+1 frames, at least "
                                                  f"{OVERLAP_FRAMES + VAE_TEMPORAL}; got {window}")
        _check_frames(frames)
        first = _plan_window(req, width, height, window, seed, preset.boundary)
        return GenerationPlan(req, width, height, frames, seed, first.conditioning, window_frames=window,
                              boundary=preset.boundary)
    return _plan_window(req, width, height, frames, seed, preset.boundary)


def replan(request: dict, seed: int, preset: str) -> GenerationPlan:
    """The plan of a stored request (checked and resolved when it was accepted) and its seed: what a process
    that gets a job from the database starts from (deterministic)."""
    return plan_request(GenerationRequest.model_validate(request), get_preset(preset), default_seed=seed)


def _check_frames(frames: int) -> None:
    if (frames - 1) % VAE_TEMPORAL:
        raise InvalidRequest("frames", f"{frames} is not of the form 4k+1 (e.g. 81)")


def _plan_window(req: GenerationRequest, width: int, height: int, frames: int, seed: int,
                 boundary: float | None = None) -> GenerationPlan:
    """The plan of one window of `frames` frames: every check of the request's task and conditioning."""
    _check_size("width", width)
    _check_size("height", height)
    _check_frames(frames)
    latent_frames = (frames - 1) // VAE_TEMPORAL + 1

    if req.task in ("t2v", "v2v") and req.images:
        raise InvalidRequest("images", f"task {req.task} takes no images")
    if req.task != "v2v" and req.video is not None:
        raise InvalidRequest("video", f"task {req.task} takes no video (use v2v)")
    if req.task == "i2v" and len(req.images) != 1:
        raise InvalidRequest("images", f"i2v takes exactly one image, got {len(req.images)}")
    if req.task == "multi_frame" and len(req.images) < 2:
        raise InvalidRequest("images", f"multi_frame takes two or more images, got {len(req.images)}")
    if req.task == "v2v" and not req.video:
        raise InvalidRequest("video", "v2v needs an input video")
    if req.task == "t2v":
        if req.positions or req.multipliers:
            raise InvalidRequest("positions" if req.positions else "multipliers", "t2v takes no conditioning")
        conditioning: tuple[ConditioningFrame, ...] = ()
    else:
        positions = _latent_positions(req, latent_frames, frames)
        if positions is not None and req.task != "v2v" and len(positions) != len(req.images):
            raise InvalidRequest("positions", f"{len(positions)} positions for {len(req.images)} images")
        if positions is None:
            positions = _default_positions(req, latent_frames)
        if req.multipliers is not None:
            if len(req.multipliers) != len(positions):
                raise InvalidRequest(
                    "multipliers", f"{len(req.multipliers)} multipliers for {len(positions)} positions"
                )
            for m in req.multipliers:
                if not 0.0 <= m <= 1.0:
                    raise InvalidRequest("multipliers", f"{m} is outside [0, 1]")
            multipliers = list(req.multipliers)
        else:
            multipliers = _default_multipliers(req, len(positions), req.positions is not None)
        source = "video" if req.task == "v2v" else "image"
        conditioning = tuple(
            ConditioningFrame(p, float(m), source, None if source == "video" else i)
            for i, (p, m) in enumerate(zip(positions, multipliers))
        )

    return GenerationPlan(req, width, height, frames, seed, conditioning, boundary=boundary)
