"""Measure a device's cost calibration (`pusa_jobs/cost.py`): seconds per DiT forward at two sizes,
fitted to ``a·M + b·M²`` (M: million pixel-frames), the decode's ``d·M`` and the encoders' fixed time.

    python bench/cost_calibration.py --preset tiny                       # the CPU entry
    python bench/cost_calibration.py --preset wan14b --sizes 832x480x81 1280x720x81   # a GPU's entry

Prints the calibration as JSON, and how well it predicts a third, held-out size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pusa_jobs.cost import Calibration, estimate_gpu_seconds, megapixel_frames  # noqa: E402
from pusa_model.engine import encode_conditioning  # noqa: E402
from pusa_model.pipeline import PusaPipeline  # noqa: E402
from pusa_model.request import plan_request  # noqa: E402
from pusa_model.request_schema import GenerationRequest  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(pipe: PusaPipeline, size: str, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds per forward, per decode and of both encoders for one size (after a warm-up)."""
    width, height, frames = (int(v) for v in size.split("x"))
    plan = plan_request(GenerationRequest(prompt="a cat", width=width, height=height, frames=frames, steps=steps,
                                          guidance=5.0, seed=1), pipe.preset)
    forward, decode, encoders = [], [], []
    for _ in range(repeats + 1):
        _sync()
        t0 = time.perf_counter()
        prompt, negative = pipe.text.encode(plan.request.prompt, plan.request.negative_prompt)
        _sync()
        t1 = time.perf_counter()
        latents = pipe.denoise(plan, encode_conditioning(pipe.vae, plan), prompt, negative)
        _sync()
        t2 = time.perf_counter()
        pipe.vae.decode(latents)
        _sync()
        t3 = time.perf_counter()
        encoders.append(t1 - t0)
        forward.append((t2 - t1) / (2 * steps))
        decode.append(t3 - t2)
    med = lambda xs: statistics.median(xs[1:])  # noqa: E731  (the first round warms up)
    return {"m": megapixel_frames(plan), "forward": med(forward), "decode": med(decode), "encoders": med(encoders),
            "plan": plan}


def fit(small: dict, large: dict) -> Calibration:
    """Solve a·M + b·M² through the two forward times (b clipped at 0); d and fixed from the larger."""
    m1, m2, f1, f2 = small["m"], large["m"], small["forward"], large["forward"]
    b = max(0.0, (f2 / m2 - f1 / m1) / (m2 - m1))
    a = max(0.0, f1 / m1 - b * m1)
    return Calibration(a=round(a, 6), b=round(b, 8), d=round(large["decode"] / large["m"], 6),
                       fixed_s=round(large["encoders"], 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--sizes", nargs=3, default=["128x128x17", "256x256x33", "192x192x25"],
                        help="two sizes to fit, one to check (WIDTHxHEIGHTxFRAMES)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = PusaPipeline.from_preset(args.preset)
    small, large, held_out = (measure(pipe, size, args.steps, args.repeats) for size in args.sizes)
    calibration = fit(small, large)
    measured = args.steps * 2 * held_out["forward"] + held_out["decode"] + held_out["encoders"]
    predicted = estimate_gpu_seconds(held_out["plan"], calibration)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps({"device": device, "preset": args.preset, "calibration": calibration.model_dump(),
                      "held_out": {"size": args.sizes[2], "steps": args.steps, "measured_s": round(measured, 4),
                                   "predicted_s": round(predicted, 4)}}, indent=2))


if __name__ == "__main__":
    main()
