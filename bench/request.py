"""Whole i2v requests on one GPU through the in-process `PusaPipeline`, stage by stage, per variant.

Wan2.1-14B-size components with random weights, made directly on the GPU: the transformer
(``WanTransformer3DModel()`` defaults) in bf16 with the checkpoint's float32 modules, UMT5-XXL in bf16,
the Wan VAE (``AutoencoderKLWan()`` defaults) in float32 as `pusa_model.loading` loads it, and the tiny
preset's tokenizer (its ids are valid UMT5 ids). They are wrapped in the service's stages
(`TextEncoderStage`, `VAEStage` untiled, `DiTStage` with ``DiTOptions(compile=True, attention="auto")``)
and run through ``PusaPipeline.generate``: 832×480, 81 frames, 10 steps, guidance 5 (two forwards a
step), a random-pixel PNG as the start frame, a fixed seed.

Variants (``--variants``, run in this order on the one model):

- ``standard``: ``steps`` (10) at ``guidance`` (5), the Pusa LoRA fused (rank ``--pusa-rank``, alpha 1.4);
- ``fast``: 4 steps at guidance 1 (one forward a step), the Pusa LoRA and a step-distillation LoRA in
  LightX2V's form (rank ``--distill-rank``) fused at 1.4 and 1.0, as mode ``fast`` runs;
- ``fast_fp8``: ``fast`` with the blocks' GEMMs in FP8 (`quantize_blocks`, after the fuse);
- ``fast_fp8_bf16vae``: ``fast_fp8`` with the VAE's decoder in bf16 (``vae_decode_dtype: bfloat16``).

The LoRAs are random (`bench/lora_switch.py`'s), fused once before the variant's requests, as on a
replica that holds the combination (switch times: `lora_switch.py`). Per variant one warm-up request of
one step per expert (``torch.compile`` runs here, at the same shapes) and then ``--requests`` timed ones. Per
request: ``generate``'s own ``timings_s`` (text, conditioning, denoise, decode with the MP4 encoded as
the frames decode, write = the thumbnail), the per-step times from its ``on_step`` callback, forwards per
step, the total, and the peak GPU memory of each stage (the stage methods are wrapped to reset the peak
before each call and read it after; nothing else changes).

Then the decode on the last request's final latents, four ways: float32 or bf16, and the MP4 written
after the decode (serial) or while it decodes (`decode_to_mp4`, what ``generate`` does); the decode
alone; the MP4 alone of those frames and of smooth ones (random weights decode to noise).

Then (``--lora-blocks`` > 0) the single-LoRA fuse: a rank-512 random LoRA on every targeted Linear (q, k, v, o of both attentions,
ffn.0, ffn.2) of the first ``--lora-blocks`` blocks (of 40), fused with `LoraFuser` from base weights
held on the GPU (the arithmetic alone) and from a safetensors file (the service's
`SafetensorsWeights` path; the file was just written, so it is read from the page cache). The time
for all 40 blocks is that times 40 / blocks.

``--model pusa-wan2.2`` runs the same on Pusa-Wan2.2's two experts: two random transformers of the same size
(Wan2.2-T2V-A14B's experts have Wan2.1-14B's architecture), a `DiTExperts` that runs each step on the expert
the boundary (0.875) gives it, each expert's own random Pusa and distill LoRAs (fused at the authors' 1.5 and
1.4, and 1.0), kept with their base weights in host memory (both bf16 experts and UMT5-XXL take 69 GB of the
card); per request also the forwards per expert.

``--tiny`` runs the same code on the CPU in float32 with the tiny preset's configs. See bench/README.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
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
from lora_switch import distill_lora, pusa_lora  # noqa: E402
from pusa_model.random_checkpoint import UMT5_XXL  # noqa: E402
from pusa_model.dit import DiTExperts, DiTStage  # noqa: E402
from pusa_model import media  # noqa: E402
from pusa_model.lora import LoraFuser, LoraStack, SafetensorsWeights, convert_lora_state_dict, load_lora_state_dict  # noqa: E402,E501
from pusa_model.engine import StepEvent, decode_to_mp4  # noqa: E402
from pusa_model.pipeline import PusaPipeline  # noqa: E402
from pusa_model.quantize import is_quantized, quantize_blocks  # noqa: E402
from pusa_model.presets import (  # noqa: E402
    MODEL_NAME,
    MODEL_NAMES,
    TINY_PRESETS,
    get_preset,
    build_tiny_lora_state_dict,
    build_tiny_tokenizer,
    tiny_text_encoder_config,
    tiny_vae_config,
)
from pusa_model.request import plan_request  # noqa: E402
from pusa_model.request_schema import GenerationRequest  # noqa: E402
from pusa_model.text import TextEncoderStage  # noqa: E402
from pusa_model.transformer import DiTOptions  # noqa: E402
from pusa_model.vae import VAEStage  # noqa: E402

GIB = 2**30
# name: (fast, GEMMs, VAE decode type); fast = 4 steps at guidance 1 with the distill LoRA beside the Pusa LoRA
VARIANTS = {
    "standard": (False, "none", "float32"),
    "fast": (True, "none", "float32"),
    "fast_fp8": (True, "fp8", "float32"),
    "fast_fp8_bf16vae": (True, "fp8", "bfloat16"),
}
PROMPT = "A cat walks on the grass, realistic, cinematic lighting"


def build_pipeline(args, device: torch.device) -> tuple[PusaPipeline, dict[str, VAEStage], dict]:
    """The three stages with random weights at the real sizes (tiny ones with ``--tiny``), and the VAE
    stage of each decode type (float32, bfloat16: two copies of the one random VAE)."""
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

    width, height, frames = (160, 96, 9) if args.tiny else (832, 480, 81)
    preset = dataclasses.replace(get_preset(TINY_PRESETS[args.model]), name="bench", source="unused", lora=None,
                                 lora_2=None, width=width, height=height, frames=frames,
                                 dtype=str(dtype).removeprefix("torch."))
    t0 = time.perf_counter()
    transformers = [build_transformer(args.tiny, args.layers, device, dtype, args.seed + e)
                    for e in range(preset.experts)]
    sync(device)
    seconds["transformer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    options = DiTOptions(compile=not args.eager, attention=args.attention)
    stages = [DiTStage(t, options=options, expert=e) for e, t in enumerate(transformers)]
    dit = stages[0] if len(stages) == 1 else DiTExperts(stages)
    text = TextEncoderStage(tokenizer, text_encoder)
    vae_stages = {"bfloat16": VAEStage(copy.deepcopy(vae), tiling=args.vae_tiling, decode_dtype=torch.bfloat16),
                  "float32": VAEStage(vae, tiling=args.vae_tiling)}
    seconds["stages"] = time.perf_counter() - t0
    return PusaPipeline(preset, text, vae_stages["float32"], dit), vae_stages, seconds


def dit_stages(pipeline: PusaPipeline) -> list[DiTStage]:
    """The pipeline's DiT stages, one per expert."""
    dit = pipeline.dit
    return list(dit.stages) if isinstance(dit, DiTExperts) else [dit]


class StageProbe:
    """Wraps the stage methods `generate` calls (on the instances only) to record each stage's peak
    GPU memory and count DiT forwards. Each wrapped call resets the peak first; every stage method
    returns CPU tensors, so the GPU work is finished when the call returns."""

    STAGES = {"text": ("text", "encode"), "conditioning": ("vae", "encode"), "denoise": ("dit", "step"),
              "decode": ("vae", "decode_chunks")}  # "dit": each expert's stage

    def __init__(self, pipeline: PusaPipeline, vae_stages: dict[str, VAEStage], device: torch.device) -> None:
        self.device = device
        self.peak_gib: dict[str, float] = {}
        self.forwards: dict[int, int] = {}  # per expert
        self._originals: list[tuple[object, str]] = []
        objects = {"vae": list(vae_stages.values()), "dit": dit_stages(pipeline), "text": [pipeline.text]}
        # vae.encode and vae.decode are different stages of the same object; every decode type's VAE
        for stage, (attr, method) in self.STAGES.items():
            for obj in objects[attr]:
                self._wrap(obj, method, stage)
        for dit in objects["dit"]:
            self._wrap_velocity(dit)
        self._wrap_denoise(pipeline)
        self.latents: torch.Tensor | None = None  # the last request's final latents

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _read_peak(self, stage: str) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / GIB
            self.peak_gib[stage] = max(self.peak_gib.get(stage, 0.0), peak)

    def _wrap(self, obj: object, method: str, stage: str) -> None:
        original = getattr(obj, method)
        self._originals.append((obj, method))

        def wrapped(*args, **kwargs):
            self._reset_peak()
            out = original(*args, **kwargs)
            self._read_peak(stage)
            return out

        def wrapped_chunks(*args, **kwargs):  # decode_chunks: the peak over all its chunks
            self._reset_peak()
            yield from original(*args, **kwargs)
            self._read_peak(stage)

        setattr(obj, method, wrapped_chunks if inspect.isgeneratorfunction(original) else wrapped)

    def _wrap_denoise(self, pipeline: PusaPipeline) -> None:
        """Keep the latents of the last step (each expert's `DiTStage.run`): a request's final latents once
        it is done."""
        for dit in dit_stages(pipeline):
            original = dit.run
            self._originals.append((dit, "run"))

            def kept(*args, original=original, **kwargs):
                out = original(*args, **kwargs)
                self.latents = torch.from_numpy(out)
                return out

            dit.run = kept

    def _wrap_velocity(self, dit: DiTStage) -> None:
        original = dit.velocity
        self._originals.append((dit, "velocity"))

        def counted(*args, **kwargs):
            self.forwards[dit.expert] = self.forwards.get(dit.expert, 0) + 1
            return original(*args, **kwargs)

        dit.velocity = counted

    def reset(self) -> None:
        self.peak_gib = {}
        self.forwards = {}

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
    forwards = sum(probe.forwards.values())
    return {
        "timings_s": result.timings_s,
        "total_s": total,
        "step_s": steps,
        "step_median_s": statistics.median(steps),
        "forwards": forwards,
        "forwards_by_expert": dict(sorted(probe.forwards.items())),
        "forwards_per_step": forwards / len(steps),
        "forward_s_from_steps": statistics.median(steps) / (forwards / len(steps)),
        "peak_gib": dict(probe.peak_gib),
        "video_bytes": result.video_path.stat().st_size,
        "thumbnail_bytes": result.thumbnail_path.stat().st_size,
    }


def smooth_frames(like: np.ndarray) -> np.ndarray:
    """Frames of `like`'s shape that move smoothly (drifting gradients), as a real video's content does."""
    frames, height, width, _ = like.shape
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([np.stack([(x + 4 * t) % 256, (y + 2 * t) % 256, ((x + y) // 2 + t) % 256], -1)
                     for t in range(frames)]).astype(np.uint8)


def bench_decode(vae_stages: dict[str, VAEStage], latents: torch.Tensor, fps: int, folder: Path,
                 device: torch.device, runs: int) -> dict:
    """Decode `latents` to uint8 frames and write the MP4, with each decode type: written after the
    decode (serial) or while it decodes (overlapped, `decode_to_mp4`), and the decode alone; then the MP4
    write alone of its frames and of smooth frames. Each the median of `runs` after one untimed one."""
    video = folder / "decode.mp4"

    def decoded(vae: VAEStage) -> np.ndarray:
        return np.concatenate([media.frames_to_uint8(chunk) for chunk in vae.decode_chunks(latents)])

    def timed(work) -> dict:
        times = []
        for _ in range(runs + 1):
            sync(device)
            t0 = time.perf_counter()
            work()
            sync(device)
            times.append(time.perf_counter() - t0)
        return {"s": statistics.median(times[1:]), "runs_s": times[1:]}

    out: dict = {}
    frames = {}
    for dtype, vae in vae_stages.items():
        out[f"{dtype}_serial"] = timed(lambda: media.write_mp4(decoded(vae), video, fps))
        out[f"{dtype}_overlapped"] = timed(lambda: decode_to_mp4(vae, latents, video, fps))
        out[f"{dtype}_decode_only"] = timed(lambda: decoded(vae))
        frames[dtype] = decoded(vae)
    out["write_only"] = timed(lambda: media.write_mp4(frames["float32"], video, fps))
    out["write_only"]["mp4_bytes"] = video.stat().st_size
    smooth = smooth_frames(frames["float32"])
    out["write_only_smooth"] = timed(lambda: media.write_mp4(smooth, video, fps))
    out["write_only_smooth"]["mp4_bytes"] = video.stat().st_size
    f32, bf16 = (frames[k].astype(np.int16) for k in ("float32", "bfloat16"))
    out["bfloat16_vs_float32_uint8"] = {"max_abs": int(np.abs(bf16 - f32).max()),
                                        "mean_abs": float(np.abs(bf16 - f32).mean())}
    return out


def bench_lora(pipeline: PusaPipeline, args, device: torch.device, folder: Path) -> dict:
    """Fuse time of a rank-`args.lora_rank` random LoRA on the first `args.lora_blocks` blocks, from base
    weights on the GPU and from a safetensors file; the 40-block time is scaled from it."""
    from safetensors.torch import save_file

    transformer = dit_stages(pipeline)[0].transformer
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
    stages = ("text", "conditioning", "denoise", "decode", "write")
    lines = ["| request | forwards | s / forward | " + " | ".join(stages) + " | **total s** | peak GiB |",
             "|---|---|---|" + "---|" * len(stages) + "---|---|"]
    for name, r in report["requests"].items():
        t = r["timings_s"]
        lines.append(f"| {name} | {r['forwards']} | {r['forward_s_from_steps']:.3f} | "
                     + " | ".join(f"{t.get(stage, 0.0):.3f}" for stage in stages)
                     + f" | **{r['total_s']:.2f}** | {max(r.get('peak_gib', {}).values(), default=0.0):.1f} |")
    lines.append("")
    decode = report.get("decode")
    if decode and "error" not in decode:
        lines += ["| decode + MP4 | float32 | bfloat16 |", "|---|---|---|"]
        for way in ("serial", "overlapped", "decode_only"):
            lines.append(f"| {way} | {decode[f'float32_{way}']['s']:.3f} | {decode[f'bfloat16_{way}']['s']:.3f} |")
        lines += [f"| MP4 write alone, these frames / smooth frames | {decode['write_only']['s']:.3f} / "
                  f"{decode['write_only_smooth']['s']:.3f} | |",
                  "", f"bf16 vs float32 decode, uint8 frames: {decode['bfloat16_vs_float32_uint8']}", ""]
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
    parser.add_argument("--model", choices=MODEL_NAMES, default=MODEL_NAME, help="pusa-wan2.2: two experts")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention", default="auto", help="DiTOptions.attention")
    parser.add_argument("--eager", action="store_true", help="DiT without torch.compile")
    parser.add_argument("--vae-tiling", action="store_true")
    parser.add_argument("--layers", type=int, default=None, help="fewer DiT blocks (quick checks)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--pusa-rank", type=int, default=512, help="the Pusa LoRA's rank (0: no LoRAs fused)")
    parser.add_argument("--distill-rank", type=int, default=256, help="the distill LoRA's rank")
    parser.add_argument("--decode-runs", type=int, default=2, help="timed runs of each decode way (0: skip)")
    parser.add_argument("--lora-base", choices=("device", "cpu"), default="device",
                        help="where the LoRA stack keeps the base weights it re-fuses from")
    parser.add_argument("--lora-rank", type=int, default=512)
    parser.add_argument("--lora-blocks", type=int, default=0, help="blocks the single-LoRA fuse is measured on (0: skip)")
    parser.add_argument("--tiny", action="store_true", help="tiny preset configs, float32, on the CPU")
    parser.add_argument("--out", type=Path, default=None, help="JSON results here; the videos beside it")
    return parser.parse_args(argv)


def set_up_variant(pipeline: PusaPipeline, vae_stages: dict[str, VAEStage], stacks: list[LoraStack] | None,
                   name: str, args) -> dict:
    """Fuse the variant's LoRAs into each expert (its Pusa LoRA at the preset's alpha for that expert),
    quantize its GEMMs (after the fuse), put in the VAE of its decode type."""
    fast, gemms, decode_dtype = VARIANTS[name]
    preset, stages = pipeline.preset, dit_stages(pipeline)
    out: dict = {}
    if stacks is not None:
        t0 = time.perf_counter()
        for stack, alpha in zip(stacks, (preset.lora_alpha, preset.lora_alpha_2)):
            stack.fuse({"pusa": alpha, "distill": 1.0} if fast else {"pusa": alpha})
        sync(stages[0].device)
        out["fuse_s"] = time.perf_counter() - t0
    quantized = is_quantized(stages[0].transformer.blocks[0].attn1.to_q)
    if gemms == "none" and quantized:
        raise SystemExit("--variants: list the bf16 variants before the FP8 ones (quantizing is in place)")
    if gemms != "none" and not quantized:
        t0 = time.perf_counter()
        out["gemms"] = [quantize_blocks(stage.transformer, gemms) for stage in stages]
        out["quantize_s"] = time.perf_counter() - t0
        if stages[0].device.type == "cuda":
            torch.cuda.empty_cache()
    pipeline.vae = vae_stages[decode_dtype]
    out.update(steps=4 if fast else args.steps, guidance=1.0 if fast else args.guidance,
               loras=["pusa", "distill"] if fast else ["pusa"], decode_dtype=decode_dtype)
    return out


def build_loras(pipeline: PusaPipeline, args, device: torch.device) -> list[LoraStack] | None:
    """Per expert, the Pusa-style and LightX2V-style random LoRAs; the base weights they re-fuse from kept
    per ``--lora-base``: beside them on the GPU (``device``) or in host memory (``cpu``, the LoRAs on the
    GPU). A two-expert model keeps both in host memory (no room beside two 14B experts)."""
    if args.pusa_rank <= 0:
        return None
    stacks = []
    gen = torch.Generator(device).manual_seed(args.seed)
    for stage in dit_stages(pipeline):
        transformer = stage.transformer
        loras = {"pusa": pusa_lora(transformer, args.pusa_rank, gen, device),
                 "distill": convert_lora_state_dict(distill_lora(transformer, args.distill_rank, gen, device))}
        if pipeline.preset.experts > 1:
            loras = {name: {k: v.cpu() for k, v in lora.items()} for name, lora in loras.items()}
            stacks.append(LoraStack(transformer, loras, base_device="cpu"))
        elif args.lora_base == "cpu":
            stacks.append(LoraStack(transformer, loras, base_device="cpu", lora_device=device))
        else:
            stacks.append(LoraStack(transformer, loras, base_device=device))
    return stacks


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    report: dict = {**environment(device), "args": {k: str(v) for k, v in vars(args).items()}, "requests": {},
                    "variants": {}}
    pipeline, vae_stages, report["build_s"] = build_pipeline(args, device)
    t0 = time.perf_counter()
    stacks = build_loras(pipeline, args, device)
    report["build_s"]["loras"] = time.perf_counter() - t0
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
        probe = StageProbe(pipeline, vae_stages, device)
        for variant in args.variants.split(","):
            print(f"{variant} ...", flush=True)
            try:
                setup = report["variants"][variant] = set_up_variant(pipeline, vae_stages, stacks, variant, args)
                request = GenerationRequest(task="i2v", prompt=PROMPT, images=[str(image)], steps=setup["steps"],
                                            guidance=setup["guidance"], seed=args.seed)
                plan = plan_request(request, preset)
                setup["plan"] = {"width": plan.width, "height": plan.height, "frames": plan.frames,
                                 "latent_shape": list(plan.latent_shape), "multipliers": plan.multipliers.tolist()}
                # one step per expert (two steps: t = 1000, then 833 below the boundary), so each one compiles
                warm_up = plan_request(request.model_copy(update={"steps": preset.experts}), preset)
                names = ["warmup"] + [f"timed{i}" for i in range(args.requests)]
                for name in names:
                    result = run_request(pipeline, probe, warm_up if name == "warmup" else plan,
                                         tmp / f"{variant}_{name}.mp4", device)
                    report["requests"][f"{variant}/{name}"] = result
                    print(json.dumps({k: result[k] for k in ("timings_s", "total_s", "forwards", "peak_gib")},
                                     default=str), flush=True)
                    save()
            except Exception as error:  # noqa: BLE001 - keep what was measured
                traceback.print_exc()
                report["variants"].setdefault(variant, {})["error"] = f"{type(error).__name__}: {error}"
        probe.remove()
        if probe.latents is not None and args.decode_runs > 0:
            print("decode ...", flush=True)
            try:
                report["decode"] = bench_decode(vae_stages, probe.latents, 16, tmp, device, args.decode_runs)
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                report["decode"] = {"error": f"{type(error).__name__}: {error}"}
            save()
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
