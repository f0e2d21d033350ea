"""The other stages with random weights: Wan2.1 VAE encode/decode and UMT5-XXL text encoding.

- VAE (diffusers ``AutoencoderKLWan`` default config = the Wan2.1 VAE), float32 (what we serve) and
  bfloat16, untiled and tiled (``enable_tiling()``): encode one 480×832 frame (an i2v condition) and an
  81-frame 480×832 clip (v2v), decode 21 latent frames to 81 frames at 480×832 and 1280×720.
- Text encoder (transformers ``UMT5EncoderModel`` at umt5-xxl sizes), bfloat16: one 512-token prompt.

Each is timed after warm-up, with its peak memory. ``--tiny`` runs the same code on the CPU with the
tiny preset's sizes. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from dit_forward import environment, measure  # bench/ is on sys.path when this runs as a script
from transformers import UMT5Config, UMT5EncoderModel

from pusa_model.presets import tiny_text_encoder_config, tiny_vae_config
from pusa_model.random_checkpoint import UMT5_XXL

# Pixel (height, width) per resolution, and frames of a clip; the tiny ones are small enough for a CPU.
PIXELS = {"480p": (480, 832), "720p": (720, 1280)}
TINY_PIXELS = {"480p": (48, 80), "720p": (72, 128)}
FRAMES, TINY_FRAMES = 81, 9
TEXT_TOKENS = 512


def _row(stage: str, shape: tuple, dtype: torch.dtype, tiled: bool | None, timing) -> dict:
    return {"stage": stage, "input": list(shape), "dtype": str(dtype).removeprefix("torch."), "tiled": tiled,
            **asdict(timing)}


def bench_vae(args, device: torch.device) -> list[dict]:
    """Encode and decode timings of the Wan VAE for each dtype, untiled and tiled."""
    pixels, frames = (TINY_PIXELS, TINY_FRAMES) if args.tiny else (PIXELS, FRAMES)
    torch.manual_seed(args.seed)
    with torch.device(device):
        vae = AutoencoderKLWan(**(tiny_vae_config() if args.tiny else {})).eval().requires_grad_(False)
    ratio = vae.spatial_compression_ratio
    latent_frames = (frames - 1) // 4 + 1
    h, w = pixels["480p"]
    gen = torch.Generator(device).manual_seed(args.seed + 1)
    cases: list[tuple[str, tuple, Callable]] = [
        ("vae encode 1 frame 480p", (1, 3, 1, h, w), lambda x: vae.encode(x).latent_dist.mode()),
        (f"vae encode {frames} frames 480p", (1, 3, frames, h, w), lambda x: vae.encode(x).latent_dist.mode()),
    ]
    for res, (h, w) in pixels.items():
        shape = (1, vae.config.z_dim, latent_frames, h // ratio, w // ratio)
        cases.append((f"vae decode {latent_frames} latents {res}", shape, lambda z: vae.decode(z).sample))
    # Small tiles for the tiny model, so tiling really splits its small frames.
    tiles = dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                 tile_sample_stride_width=24) if args.tiny else {}
    rows = []
    for dtype in args.vae_dtypes:
        vae.to(dtype)
        for tiled in (False, True):
            vae.enable_tiling(**tiles) if tiled else vae.disable_tiling()
            for stage, shape, fn in cases:
                x = torch.randn(shape, generator=gen, device=device).clamp(-1, 1).to(dtype)
                print(f"{stage} {str(dtype)[6:]} {'tiled' if tiled else 'untiled'} ...", flush=True)
                timing, _ = measure(lambda: fn(x), device, args.runs, args.warmup)
                rows.append(_row(stage, shape, dtype, tiled, timing))
                del x
    return rows


def bench_text_encoder(args, device: torch.device) -> list[dict]:
    """One 512-token prompt through UMT5-XXL (encoder only) in bfloat16."""
    config = UMT5Config(**(tiny_text_encoder_config(400) if args.tiny else UMT5_XXL))
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = UMT5EncoderModel(config).eval().requires_grad_(False)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model.to(dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    gen = torch.Generator(device).manual_seed(args.seed + 2)
    ids = torch.randint(0, config.vocab_size, (1, TEXT_TOKENS), generator=gen, device=device)
    mask = torch.ones_like(ids)
    print("umt5 encode ...", flush=True)
    timing, _ = measure(lambda: model(input_ids=ids, attention_mask=mask).last_hidden_state, device, args.runs,
                        args.warmup)
    return [_row(f"umt5 encode {TEXT_TOKENS} tokens", tuple(ids.shape), dtype, None, timing)]


def table(rows: list[dict]) -> str:
    """A markdown table of the stage timings."""
    lines = [
        "| stage | input | dtype | tiled | median s | first s | peak GiB | extra GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tiled = "—" if r["tiled"] is None else ("yes" if r["tiled"] else "no")
        lines.append(
            f"| {r['stage']} | {'×'.join(map(str, r['input']))} | {r['dtype']} | {tiled} | {r['median_s']:.3f} | "
            f"{r['first_s']:.3f} | {r['peak_gib']:.2f} | {r['extra_gib']:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="text,vae", help="comma-separated: text, vae")
    parser.add_argument("--vae-dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per case (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny preset sizes on the CPU")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.parts = args.parts.split(",")
    if set(args.parts) - {"text", "vae"}:
        parser.error(f"unknown part(s): {sorted(set(args.parts) - {'text', 'vae'})}")
    args.vae_dtypes = [getattr(torch, name) for name in args.vae_dtypes.split(",")]
    if args.runs < 1 or args.warmup < 1:
        parser.error("--runs and --warmup must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    report = {**environment(device), "runs": args.runs, "warmup": args.warmup, "results": []}
    t0 = time.perf_counter()
    if "text" in args.parts:  # first: its ~23 GB float32 build needs the memory the VAE runs would fragment
        report["results"] += bench_text_encoder(args, device)
    if "vae" in args.parts:
        report["results"] += bench_vae(args, device)
    report["total_s"] = time.perf_counter() - t0
    print("\n" + table(report["results"]) + "\n", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
