"""The flow-matching schedule of Pusa V1 (shift 5) and its per-frame form.

A latent frame with noise multiplier ``m`` follows the schedule scaled by ``m``: its timestep at
step k is ``m * t_k`` and its Euler step is ``m * (sigma_{k+1} - sigma_k)``. Free frames have
``m = 1``; ``m = 0`` freezes a frame.

A two-expert model (Wan2.2-A14B) runs its high-noise expert on the steps whose scheduler timestep
``t_k = 1000 * sigma_k`` is at least ``boundary * 1000`` and its low-noise expert on the rest (`step_expert`):
the step's noise level decides, not any frame's scaled timestep ``m * t_k``.
"""

from __future__ import annotations

import torch

SHIFT = 5.0
NUM_TRAIN_TIMESTEPS = 1000


def flow_sigmas(steps: int, shift: float = SHIFT) -> torch.Tensor:
    """Noise levels ``(steps + 1,)``: shifted ``linspace(1, 0, steps + 1)[:-1]``, then a final 0."""
    raw = torch.linspace(1.0, 0.0, steps + 1)[:-1]
    sigmas = shift * raw / (1 + (shift - 1) * raw)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def frame_timesteps(sigmas: torch.Tensor, multipliers: torch.Tensor, step: int) -> torch.Tensor:
    """Model timestep of each latent frame at `step`: ``m_f * 1000 * sigma_step``, shape ``(F,)``."""
    return multipliers * (sigmas[step] * NUM_TRAIN_TIMESTEPS)


def frame_sigma_deltas(sigmas: torch.Tensor, multipliers: torch.Tensor, step: int) -> torch.Tensor:
    """Euler step size of each latent frame at `step`: ``m_f * (sigma_{k+1} - sigma_k)``, shape ``(F,)``."""
    return multipliers * (sigmas[step + 1] - sigmas[step])


def step_expert(sigma: float, boundary: float | None) -> int:
    """The expert of a step at noise level `sigma`: 0 (the high-noise expert, ``transformer``) while the
    step's timestep ``t = 1000 * sigma`` is at least ``boundary * 1000``, else 1 (the low-noise expert,
    ``transformer_2``); 0 when `boundary` is None (one expert). t is the float32 product the scheduler makes
    (the Pusa authors' loop and diffusers' `WanPipeline` compare that value), so a timestep on the boundary
    itself goes to the high-noise expert in all three."""
    if boundary is None:
        return 0
    t = (torch.tensor(sigma, dtype=torch.float32) * NUM_TRAIN_TIMESTEPS).item()
    return 0 if t >= boundary * NUM_TRAIN_TIMESTEPS else 1
