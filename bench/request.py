"""One whole i2v request on one GPU through the in-process `PusaPipeline`, stage by stage.

Wan2.1-14B-size components with random weights, made directly on the GPU: the transformer
(``WanTransformer3DModel()`` defaults) in bf16 with the checkpoint's float32 modules, UMT5-XXL in bf16,
the Wan VAE (``AutoencoderKLWan()`` defaults) in float32 as `pusa_model.loading` loads it, and the tiny
preset's tokenizer (its ids are valid UMT5 ids). They are wrapped in the service's stages
(`TextEncoderStage`, `VAEStage` untiled, `DiTStage` with ``DiTOptions(compile=True, attention="auto")``)
and run through ``PusaPipeline.generate``: 832×480, 81 frames, 10 steps, guidance 5 (two forwards a
step), a random-pixel PNG as the start frame, a fixed seed.

One warm-up request (``torch.compile`` runs here) and then ``--requests`` timed ones. Per request:
``generate``'s own ``timings_s`` (text, conditioning, denoise, decode, write), the per-step times from
its ``on_step`` callback, forwards per step, the total, and the peak GPU memory of each stage (the stage
methods are wrapped to reset the peak before each call and read it after; nothing else changes).

Then the LoRA fuse: a rank-512 random LoRA on every targeted Linear (q, k, v, o of both attentions,
ffn.0, ffn.2) of the first ``--lora-blocks`` blocks (of 40), fused with `LoraFuser` from base weights
held on the GPU (the arithmetic alone) and from a safetensors file (the service's
`SafetensorsWeights` path; the file was just written, so it is read from the page cache). The time
for all 40 blocks is that times 40 / blocks.

``--tiny`` runs the same code on the CPU in float32 with the tiny preset's configs. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKLWan  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import UMT5Config, UMT5EncoderModel  # noqa: E402

from dit_forward import build_transformer, environment, sync  # noqa: E402
from stages import UMT5_XXL  # noqa: E402
from pusa_model.dit import DiTStage  # noqa: E402
from pusa_model.lora import LoraFuser, SafetensorsWeights, load_lora_state_dict  # noqa: E402
from pusa_model.pipeline import PusaPipeline, StepEvent  # noqa: E402
from pusa_model.presets import (  # noqa: E402
    Preset,
    build_tiny_lora_state_dict,
    build_tiny_tokenizer,
    tiny_text_encoder_config,
    tiny_vae_config,
)
from pusa_model.request import GenerationRequest, plan_request  # noqa: E402
from pusa_model.text import TextEncoderStage  # noqa: E402
from pusa_model.transformer import DiTOptions  # noqa: E402
from pusa_model.vae import VAEStage  # noqa: E402

GIB = 2**30
PROMPT = "A cat walks on the grass, realistic, cinematic lighting"


def build_pipeline(args, device: torch.device) -> tuple[PusaPipeline, dict]:
    """The three stages with random weights at the real sizes (tiny ones with ``--tiny``)."""
    dtype = torch.float32 if args.tiny else torch.bfloat16
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    tokenizer = build_tiny_tokenizer()
    # The text encoder first: its float32 build (~23 GB) needs memory before the transformer's 28 GB.
    config = UMT5Config(**(tiny_text_encoder_config(len(tokenizer)) if args.tiny else UMT5_XXL))
    torch.manual_seed(args.seed)
    with torch.device(device):
        text_encoder = UMT5EncoderModel(config).eval().requires_grad_(False)
    text_encoder.to(dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    sync(device)
    seconds["text_encoder"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with torch.device(device):
        vae = AutoencoderKLWan(**(tiny_vae_config() if args.tiny else {})).eval().requires_grad_(False)
    vae.to(torch.float32)  # as pusa_model.loading loads it
    sync(device)
    seconds["vae"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    transformer = build_transformer(args.tiny, args.layers, device, dtype, args.seed)
    sync(device)
    seconds["transformer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    dit = DiTStage(transformer, options=DiTOptions(compile=not args.eager, attention=args.attention))
    text = TextEncoderStage(tokenizer, text_encoder)
    vae_stage = VAEStage(vae, tiling=args.vae_tiling)
    seconds["stages"] = time.perf_counter() - t0

    width, height, frames = (160, 96, 9) if args.tiny else (832, 480, 81)
    preset = Preset(name="bench", source="unused", lora=None, width=width, height=height, frames=frames,
                    dtype=str(dtype).removeprefix("torch."))
    return PusaPipeline(preset, text, vae_stage, dit), seconds


class StageProbe:
    """Wraps the stage methods `generate` calls (on the instances only) to record each stage's peak
    GPU memory and count DiT forwards. Each wrapped call resets the peak first; every stage method
    returns CPU tensors, so the GPU work is finished when the call returns."""

    STAGES = {"text": ("text", "encode"), "conditioning": ("vae", "encode"), "denoise": ("dit", "step"),
              "decode": ("vae", "decode")}

    def __init__(self, pipeline: PusaPipeline, device: torch.device) -> None:
        self.device = device
        self.peak_gib: dict[str, float] = {}
        self.forwards = 0
        self._originals: list[tuple[object, str]] = []
        # vae.encode and vae.decode are different stages of the same object
        for stage, (attr, method) in self.STAGES.items():
            self._wrap(getattr(pipeline, attr), method, stage)
        self._wrap_velocity(pipeline.dit)

    def _wrap(self, obj: object, method: str, stage: str) -> None:
        original = getattr(obj, method)
        self._originals.append((obj, method))

        def wrapped(*args, **kwargs):
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            out = original(*args, **kwargs)
            if self.device.type == "cuda":
                sync(self.device)
                peak = torch.cuda.max_memory_allocated(self.device) / GIB
                self.peak_gib[stage] = max(self.peak_gib.get(stage, 0.0), peak)
            return out

        setattr(obj, method, wrapped)

    def _wrap_velocity(self, dit: DiTStage) -> None:
        original = dit.velocity
        self._originals.append((dit, "velocity"))

        def counted(*args, **kwargs):
            self.forwards += 1
            return original(*args, **kwargs)

        dit.velocity = counted

    def reset(self) -> None:
        self.peak_gib = {}
        self.forwards = 0

    def remove(self) -> None:
        for obj, method in self._originals:
            delattr(obj, method)  # back to the class's method


def run_request(pipeline: PusaPipeline, probe: StageProbe, plan, output: Path, device: torch.device) -> dict:
    """One ``generate`` call; returns its timings, per-step times, forwards and per-stage peaks."""
    probe.reset()
    events: list[StepEvent] = []
    sync(device)
    t0 = time.perf_counter()
    result = pipeline.generate(plan, output, on_step=events.append)
    total = time.perf_counter() - t0
    elapsed = [e.elapsed_s for e in events]
    steps = [b - a for a, b in zip([0.0] + elapsed[:-1], elapsed)]
    return {
        "timings_s": result.timings_s,
        "total_s": total,
        "step_s": steps,
        "step_median_s": statistics.median(steps),
        "forwards": probe.forwards,
        "forwards_per_step": probe.forwards / len(steps),
        "forward_s_from_steps": statistics.median(steps) / (probe.forwards / len(steps)),
        "peak_gib": dict(probe.peak_gib),
        "video_bytes": result.video_path.stat().st_size,
        "thumbnail_bytes": result.thumbnail_path.stat().st_size,
    }


def bench_lora(pipeline: PusaPipeline, args, device: torch.device, folder: Path) -> dict:
    """Fuse time of a rank-`args.lora_rank` random LoRA on the first `args.lora_blocks` blocks, from base
    weights on the GPU and from a safetensors file; the 40-block time is scaled from it."""
    from safetensors.torch import save_file

    transformer = pipeline.dit.transformer
    blocks = min(args.lora_blocks, len(transformer.blocks))
    scale = len(transformer.blocks) / blocks
    out: dict = {"rank": args.lora_rank, "blocks_measured": blocks, "blocks_total": len(transformer.blocks)}

    t0 = time.perf_counter()
    state = build_tiny_lora_state_dict(SimpleNamespace(blocks=transformer.blocks[:blocks]), rank=args.lora_rank)
    out["random_state_s"] = time.perf_counter() - t0
    lora_file = folder / "lora.safetensors"
    save_file(state, str(lora_file))
    out["lora_file_gib"] = lora_file.stat().st_size / GIB
    del state
    t0 = time.perf_counter()
    lora = load_lora_state_dict(lora_file)  # the service's loading path (PEFT keys -> diffusers names)
    out["load_s"] = time.perf_counter() - t0
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in lora})
    out["modules"] = len(modules)

    # Base weights: GPU clones of the targeted weights (no disk), and a safetensors file of them.
    base_gpu = {f"{m}.weight": transformer.get_submodule(m).weight.detach().clone() for m in modules}
    base_dir = folder / "transformer"
    base_dir.mkdir()
    save_file({k: v.cpu() for k, v in base_gpu.items()}, str(base_dir / "diffusion_pytorch_model.safetensors"))
    out["base_file_gib"] = (base_dir / "diffusion_pytorch_model.safetensors").stat().st_size / GIB

    def timed_fuses(fuser: LoraFuser, label: str) -> None:
        times = []
        for alpha in (1.4, 1.0, 1.4):  # the first fuse, then re-fuses at another alpha (from the base)
            sync(device)
            t = time.perf_counter()
            fuser.fuse(alpha)
            sync(device)
            times.append(time.perf_counter() - t)
        out[label] = {"fuse_s": times, f"first_x{scale:g}_s": times[0] * scale,
                      f"refuse_median_x{scale:g}_s": statistics.median(times[1:]) * scale}

    timed_fuses(LoraFuser(transformer, lora, base_weights=base_gpu), "base_on_gpu")
    timed_fuses(LoraFuser(transformer, lora, base_weights=SafetensorsWeights(base_dir)), "base_from_safetensors")
    LoraFuser(transformer, lora, base_weights=base_gpu).fuse(0.0)  # restore W0
    del base_gpu
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def write_image(path: Path, width: int, height: int, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def report_tables(report: dict) -> str:
    lines = []
    for name, r in report["requests"].items():
        t = r["timings_s"]
        peaks = r.get("peak_gib", {})
        lines += [
            f"### {name} request: total {r['total_s']:.2f} s; {r['forwards']} forwards "
            f"({r['forwards_per_step']:g} per step), {r['forward_s_from_steps']:.3f} s per forward (median step / "
            "forwards per step)",
            "",
            "| stage | s | peak GiB |",
            "|---|---|---|",
        ]
        for stage in ("text", "conditioning", "denoise", "decode", "write"):
            peak = f"{peaks[stage]:.2f}" if stage in peaks else "—"
            lines.append(f"| {stage} | {t[stage]:.3f} | {peak} |")
        lines += ["", "steps s: " + ", ".join(f"{s:.3f}" for s in r["step_s"]) +
                  f" (median {r['step_median_s']:.3f})", ""]
    lora = report.get("lora")
    if lora and "error" not in lora:
        lines += [
            f"### LoRA fuse: rank {lora['rank']}, {lora['modules']} Linears of {lora['blocks_measured']} blocks "
            f"(LoRA file {lora['lora_file_gib']:.2f} GiB, load {lora['load_s']:.2f} s); scaled to "
            f"{lora['blocks_total']} blocks",
            "",
            "| base weights | fuse s (1.4, 1.0, 1.4) | first, scaled | re-fuse, scaled |",
            "|---|---|---|---|",
        ]
        for label in ("base_on_gpu", "base_from_safetensors"):
            r = lora[label]
            first = next(v for k, v in r.items() if k.startswith("first"))
            refuse = next(v for k, v in r.items() if k.startswith("refuse"))
            lines.append(f"| {label} | {', '.join(f'{s:.3f}' for s in r['fuse_s'])} | {first:.2f} | {refuse:.2f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1, help="timed requests after the warm-up")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention", default="auto", help="DiTOptions.attention")
    parser.add_argument("--eager", action="store_true", help="DiT without torch.compile")
    parser.add_argument("--vae-tiling", action="store_true")
    parser.add_argument("--layers", type=int, default=None, help="fewer DiT blocks (quick checks)")
    parser.add_argument("--lora-rank", type=int, default=512)
    parser.add_argument("--lora-blocks", type=int, default=4, help="blocks the LoRA fuse is measured on (0: skip)")
    parser.add_argument("--tiny", action="store_true", help="tiny preset configs, float32, on the CPU")
    parser.add_argument("--out", type=Path, default=None, help="JSON results here; the videos beside it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    report: dict = {**environment(device), "args": {k: str(v) for k, v in vars(args).items()}, "requests": {}}
    pipeline, report["build_s"] = build_pipeline(args, device)
    if device.type == "cuda":
        report["weights_gib"] = torch.cuda.memory_allocated(device) / GIB
    print(f"{report['device']}, torch {report['torch']}; built {report['build_s']}", flush=True)

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2, default=str))

    with tempfile.TemporaryDirectory(prefix="pusa-bench-") as tmp:
        tmp = Path(tmp)
        preset = pipeline.preset
        image = tmp / "start.png"
        write_image(image, preset.width, preset.height, args.seed)
        request = GenerationRequest(task="i2v", prompt=PROMPT, images=[str(image)], steps=args.steps,
                                    guidance=args.guidance, seed=args.seed)
        plan = plan_request(request, preset)
        report["plan"] = {"width": plan.width, "height": plan.height, "frames": plan.frames,
                          "latent_shape": list(plan.latent_shape), "steps": args.steps, "guidance": args.guidance,
                          "multipliers": plan.multipliers.tolist()}
        videos = tmp  # the MP4s are noise (random weights): sizes are reported, the files stay behind
        probe = StageProbe(pipeline, device)
        names = ["warmup"] + [f"timed{i}" if args.requests > 1 else "timed" for i in range(args.requests)]
        for name in names:
            print(f"{name} request ...", flush=True)
            try:
                report["requests"][name] = run_request(pipeline, probe, plan, videos / f"request_{name}.mp4", device)
            except Exception as error:  # noqa: BLE001 - keep what was measured
                traceback.print_exc()
                report["requests_error"] = f"{name}: {type(error).__name__}: {error}"
                break
            r = report["requests"][name]
            print(json.dumps({k: r[k] for k in ("timings_s", "total_s", "forwards", "peak_gib")}, default=str),
                  flush=True)
            save()
        probe.remove()
        if args.lora_blocks > 0:
            print("LoRA fuse ...", flush=True)
            try:
                report["lora"] = bench_lora(pipeline, args, device, tmp)
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                report["lora"] = {"error": f"{type(error).__name__}: {error}"}
    save()
    print("\n" + report_tables(report) + "\n", flush=True)


if __name__ == "__main__":
    main()
