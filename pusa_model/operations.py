"""The plan of operations of one generation, and the one typed input of a denoising step.

A `GenerationPlan` says what to make; its `operations` say how, in order: encode the text, encode the first
window's conditioning (none for t2v), denoise step k of window w, and for a long video decode window w and
encode the next window's conditioning from its last frames; at the end the video: decoded from the latents
(one window) or stitched from the windows' frames. Three drivers execute this one list, each with its own
executor: `engine.LocalEngine` in memory (`PusaPipeline.generate`, and the batch's Ray Data stages, each
taking its part), and the service's `JobRun` through the stage deployments, with a checkpoint and an event
after each step. Resuming is continuing at an operation index (`Operations.after_steps`).

`StepInput` is what one denoising step computes from: the same frozen object goes from the runner through
the DiT deployment and its group's workers to `DiTStage.run`. The LoRA combination is not part of it: it is
the weights the step runs on, which the executor fuses (the service routes the step to a replica holding
them).

The plan is the same for every model: a two-expert model (Pusa-Wan2.2) has the same operations, and each
step's `StepInput` names its `expert` (`GenerationPlan.expert`: by the step's timestep against the model's
boundary) and carries that expert's guidance; the executor runs it on that expert's DiT with that expert's
LoRA combination (`GenerationPlan.lora_combination_of`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Union

import numpy as np

if TYPE_CHECKING:
    from .request import GenerationPlan


@dataclass(frozen=True)
class EncodeText:
    """The prompt's embeddings (and the negative prompt's, with guidance). Never saved: a resumed run
    encodes them again (they are deterministic)."""


@dataclass(frozen=True)
class EncodeConditioning:
    """Clean latents of window 0 from the request's media (images or clip). t2v has none."""

    window: int = 0


@dataclass(frozen=True)
class EncodeExtension:
    """Clean latents of a later window of a long video from the last frames of the window before."""

    window: int


@dataclass(frozen=True)
class DenoiseStep:
    """Step `step` of window `window`; `done`: the steps done once it has run, counted over every window
    (events, progress and checkpoints count these)."""

    window: int
    step: int
    done: int


@dataclass(frozen=True)
class DecodeWindow:
    """A long video's window decoded into frames, kept for the next window's conditioning and the stitch."""

    window: int


@dataclass(frozen=True)
class DecodeVideo:
    """The video of one window: its latents decoded into the MP4 (encoded as the frames decode) and the
    thumbnail."""


@dataclass(frozen=True)
class Stitch:
    """A long video's MP4 and thumbnail from its windows' frames: the first, then each later one after the
    frames it shares with the window before."""


Operation = Union[EncodeText, EncodeConditioning, EncodeExtension, DenoiseStep, DecodeWindow, DecodeVideo, Stitch]


@dataclass(frozen=True)
class Operations:
    """The ordered operations of `plan` (its windows' plans are ``plan.windows``)."""

    plan: GenerationPlan
    ops: tuple[Operation, ...]

    def __len__(self) -> int:
        return len(self.ops)

    def __getitem__(self, index: int) -> Operation:
        return self.ops[index]

    def __iter__(self):
        return iter(self.ops)

    @property
    def steps(self) -> int:
        """Denoising steps over every window."""
        return sum(isinstance(op, DenoiseStep) for op in self.ops)

    def index(self, op: Operation) -> int:
        return self.ops.index(op)

    def after_steps(self, done: int) -> int:
        """Where a run continues once `done` steps are done (0: from the start): the operation after the
        step that made them, which a checkpoint of its latents lets any executor skip to."""
        if done == 0:
            return 0
        return next(i for i, op in enumerate(self.ops) if isinstance(op, DenoiseStep) and op.done == done) + 1

    def window_start(self, window: int) -> int:
        """The first operation of `window`: its conditioning, or its first step when it has none."""
        return next(i for i, op in enumerate(self.ops)
                    if getattr(op, "window", None) == window and not isinstance(op, DecodeWindow))

    @property
    def denoising(self) -> slice:
        """From the first step to the last, with a long video's decodes and extensions between windows."""
        steps = [i for i, op in enumerate(self.ops) if isinstance(op, DenoiseStep)]
        return slice(steps[0], steps[-1] + 1)


def plan_operations(plan: GenerationPlan) -> Operations:
    """The operations that make `plan`'s video."""
    windows, steps = plan.windows, plan.request.steps
    ops: list[Operation] = [EncodeText()]
    for w, window in enumerate(windows):
        if w:
            ops.append(EncodeExtension(w))
        elif window.conditioning:
            ops.append(EncodeConditioning())
        ops.extend(DenoiseStep(w, k, w * steps + k + 1) for k in range(steps))
        if len(windows) > 1:
            ops.append(DecodeWindow(w))
    ops.append(Stitch() if len(windows) > 1 else DecodeVideo())
    return Operations(plan, tuple(ops))


@dataclass(frozen=True, eq=False)
class StepInput:
    """Everything denoising step `step` of one window needs: plain numbers and numpy arrays (picklable, no
    torch, no Ray), so any DiT replica or rank can take any step.

    At step 0 `latents` is None: the step starts from the seed's noise of `shape`, with the conditioning's
    `clean` latents mixed in by their multipliers (None: no conditioning, as for t2v). `text` is the prompt's
    and negative prompt's embeddings (the negative None without guidance), or a reference to them that the
    executor resolves before the step (the service's object-store reference, put once a job). `expert` is the
    transformer that runs it (0, or 1 for a two-expert model's low-noise expert) and `guidance` that expert's."""

    step: int
    sigmas: tuple[float, ...]
    multipliers: tuple[float, ...]
    guidance: float
    mode: str
    seed: int
    shape: tuple[int, ...]
    latents: np.ndarray | None = None
    clean: np.ndarray | None = None
    text: Any = None
    expert: int = 0

    @classmethod
    def of(cls, plan: GenerationPlan, step: int, latents: np.ndarray | None, clean: np.ndarray | None,
           text: Any) -> StepInput:
        """Step `step` of window `plan` (`clean` matters at step 0 only)."""
        return cls(step, tuple(plan.sigmas.tolist()), tuple(plan.multipliers.tolist()), plan.guidance_at(step),
                   plan.request.mode, plan.seed, plan.latent_shape, latents, clean if step == 0 else None, text,
                   plan.expert(step))

    @property
    def last(self) -> bool:
        """Whether it is the window's last step (the one before the schedule's final sigma)."""
        return self.step == len(self.sigmas) - 2

    def with_text(self, text: Any) -> StepInput:
        return replace(self, text=text)
