"""What a request costs: its GPU-seconds, estimated before it runs from a calibration per GPU kind.

A DiT forward over ``M`` million pixel-frames (width × height × frames / 10⁶) takes ``a·M + b·M²``
seconds (the square term is attention); a request makes ``steps × passes`` of them (two passes with
guidance, one without; on a two-expert model each step's by its expert's guidance), plus a VAE decode of
``d·M`` and ``fixed_s`` of text and conditioning encoding.
A long video costs the sum of its windows.
`bench/cost_calibration.py` measures a, b and d on a device.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pusa_model.presets import Preset
from pusa_model.request import GenerationPlan


class Calibration(BaseModel):
    """Seconds of one GPU kind: per forward ``a·M + b·M²``, per decode ``d·M``, plus ``fixed_s``."""

    model_config = ConfigDict(extra="forbid")

    a: float = Field(ge=0)
    b: float = Field(ge=0)
    d: float = Field(ge=0)
    fixed_s: float = Field(ge=0)


CALIBRATIONS: dict[str, Calibration] = {
    # Wan2.1-14B, compiled DiT, on an H100: forwards of 2.853 s at 832×480×81 and 11.277 s at
    # 1280×720×81, a float32 decode of 3.864 s at 480p, 0.22 s of encoders (docs/benchmarks.md).
    "nvidia-h100": Calibration(a=0.04011, b=0.001486, d=0.1194, fixed_s=0.22),
    # An estimate, not a measurement: the H100's figures × 6.4, the ratio of the two cards' dense bf16
    # tensor rates (989 / 155 TFLOPS). Replace it with `bench/cost_calibration.py` run on an A6000.
    "nvidia-rtx-a6000": Calibration(a=0.2567, b=0.009510, d=0.7642, fixed_s=1.41),
    # The tiny preset on a 2-core CPU (`python bench/cost_calibration.py --preset tiny`; a held-out
    # 192×192×25 request of 4 steps: 2.26 s predicted, 2.06 s measured).
    "cpu": Calibration(a=0.007927, b=0.0, d=2.351507, fixed_s=0.0312),
}


class CostSettings(BaseModel):
    """App arg ``api.cost``: the GPU kind the DiT runs on (or a calibration of one's own) and the largest
    request a single job may be."""

    model_config = ConfigDict(extra="forbid")

    gpu_kind: str = "cpu"
    calibration: Calibration | None = None  # overrides CALIBRATIONS[gpu_kind]
    max_gpu_seconds: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # larger requests: 400

    def model_post_init(self, _) -> None:
        if self.calibration is None and self.gpu_kind not in CALIBRATIONS:
            raise ValueError(f"api.cost.gpu_kind: no calibration for {self.gpu_kind!r} "
                             f"(known: {', '.join(CALIBRATIONS)}); give api.cost.calibration")

    @property
    def table(self) -> Calibration:
        return self.calibration or CALIBRATIONS[self.gpu_kind]


def megapixel_frames(plan: GenerationPlan) -> float:
    return plan.width * plan.height * plan.frames / 1e6


def passes(plan: GenerationPlan) -> int:
    """DiT forwards of the costliest step: two with classifier-free guidance, one without."""
    return max(1 if g == 1.0 else 2 for g in plan.guidances)


def forwards(plan: GenerationPlan) -> int:
    """DiT forwards of a window: per step two with classifier-free guidance, one without, each step with its
    own expert's guidance (a two-expert model's ``guidance`` and ``guidance_2``). The experts have the same
    architecture, so a forward costs the same on either."""
    return sum(1 if plan.guidance_at(k) == 1.0 else 2 for k in range(plan.request.steps))


def estimate_gpu_seconds(plan: GenerationPlan, calibration: Calibration) -> float:
    """The GPU-seconds `plan` is expected to take (a long video: the sum of its windows)."""
    return sum(_window_gpu_seconds(window, calibration) for window in plan.windows)


def _window_gpu_seconds(window: GenerationPlan, c: Calibration) -> float:
    m = megapixel_frames(window)
    return forwards(window) * (c.a * m + c.b * m * m) + c.d * m + c.fixed_s


def cost_drivers(plan: GenerationPlan, preset: Preset) -> list[str]:
    """The request fields that make `plan` larger than the preset's default request, largest first."""
    drivers = [
        ("size", plan.width * plan.height / (preset.width * preset.height)),
        ("frames", plan.frames / preset.frames),
        ("steps", plan.request.steps / 10),
        ("guidance", float(passes(plan))),
    ]
    return [name for name, factor in sorted(drivers, key=lambda d: -d[1]) if factor > 1] or ["size", "frames", "steps"]
