"""What a fast path does to the videos of a real checkpoint: the same requests made by the standard path
and by each fast path, compared by the PSNR and SSIM of the decoded frames (torchmetrics) and the relative
difference of the final latents.

    PUSA_MODEL_SOURCE=s3://pusa-models/wan2.1-t2v-14b python3 bench/quality.py --preset pusa-v1 \\
        --requests my_requests.jsonl --paths fp8,int8,sage,fa3,fp8+fa3fp8,fast,fast+fp8 --lora-registry loras.yaml --out q.json
    python3 bench/quality.py --preset tiny                  # every path on the CPU (random weights)

A request is a line of JSON with the fields of `POST /v1/videos` (media as local paths); without
``--requests``, two t2v prompts at the preset's size with fixed seeds. Paths, joined with ``+``:
``int8`` and ``fp8`` (the DiT's GEMMs, `DiTOptions.quantize`), ``sage`` (SageAttention), ``fast`` (the
request in mode fast: 4 steps at guidance 1 with the registry's fast LoRA, from ``--lora-registry``),
``bf16vae`` (the VAE's decoder in bf16, the service's ``vae_decode_dtype: bfloat16``; the latents are
the standard path's, so only the frames move), ``fa3`` and ``fa3fp8`` (FlashAttention-3 bf16 / FP8, sm90 with
fa3-fwd: ``attention: fa3 | fa3_fp8``; e.g. ``fp8+fa3fp8`` is every 8-bit path of an H100). The standard
path's attention is ``--attention`` (default ``sdpa``: PyTorch's own kernel, so that FA3 is compared with it).
The standard path is each request as given, with ``--compile`` if asked; every path adds to it. A path
that cannot run here falls back as the service does (logged), so compare only paths that ran. Random
weights show whether a path runs and how far its numbers move, not how a video looks: that needs the
real checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure  # noqa: E402

from pusa_model import media  # noqa: E402
from pusa_model.cli import load_registry  # noqa: E402
from pusa_model.engine import encode_conditioning  # noqa: E402
from pusa_model.pipeline import PusaPipeline  # noqa: E402
from pusa_model.request import GenerationPlan, parse_request, plan_request  # noqa: E402
from pusa_model.transformer import DiTOptions  # noqa: E402
from pusa_model.vae import VAEStage  # noqa: E402

PATH_PARTS = {"int8": {"quantize": "int8"}, "fp8": {"quantize": "fp8"}, "sage": {"attention": "sage"}, "fast": {},
              "bf16vae": {}, "fa3": {"attention": "fa3"}, "fa3fp8": {"attention": "fa3_fp8"}}
DEFAULT_REQUESTS = [
    {"prompt": "A cat walks on the grass, realistic", "seed": 1},
    {"prompt": "Waves roll onto a rocky beach at sunset", "seed": 2},
]


def path_settings(path: str, compile_: bool, attention: str = "sdpa") -> tuple[DiTOptions, dict, torch.dtype | None]:
    """The DiT options, request fields and VAE decode type of a path (``standard`` or parts joined by ``+``);
    `attention` is the attention preference of the paths that name none."""
    options, fields, decode_dtype = {"compile": compile_, "attention": attention}, {}, None
    for part in [] if path == "standard" else path.split("+"):
        if part not in PATH_PARTS:
            raise SystemExit(f"--paths: unknown path {part!r} (known: {', '.join(PATH_PARTS)})")
        options.update(PATH_PARTS[part])
        if part == "fast":
            fields["mode"] = "fast"
        if part == "bf16vae":
            decode_dtype = torch.bfloat16
    return DiTOptions(**options), fields, decode_dtype


def render(pipe: PusaPipeline, plan: GenerationPlan) -> tuple[torch.Tensor, np.ndarray]:
    """The final latents and the decoded uint8 (T, H, W, 3) frames of a one-window plan."""
    req = plan.request
    prompt, negative = pipe.text.encode(req.prompt, req.negative_prompt if req.guidance != 1.0 else None)
    latents = pipe.denoise(plan, encode_conditioning(pipe.vae, plan), prompt, negative)
    return latents, media.frames_to_uint8(pipe.vae.decode(latents))


def compare(frames: np.ndarray, reference: np.ndarray, latents: torch.Tensor, reference_latents: torch.Tensor) -> dict:
    """PSNR (dB, over the whole clip) and mean per-frame SSIM of `frames` against `reference`, and the
    final latents' difference relative to the reference's norm."""
    a, b = (torch.from_numpy(f).permute(0, 3, 1, 2).float() for f in (frames, reference))
    psnr = float(peak_signal_noise_ratio(a, b, data_range=255.0))
    ssim = float(structural_similarity_index_measure(a, b, data_range=255.0))
    latent = float((latents - reference_latents).norm() / reference_latents.norm())
    return {"psnr_db": psnr, "ssim": ssim, "latent_rel_diff": latent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--requests", type=Path, help="JSONL of API request fields (default: two t2v prompts)")
    parser.add_argument("--paths", default="int8,fast", help="comma-separated paths to compare with standard")
    parser.add_argument("--lora-registry", type=Path, help="the LoRA registry (YAML/JSON), as `pusa generate`")
    parser.add_argument("--compile", action="store_true", help="compile the DiT on every path")
    parser.add_argument("--attention", default="sdpa",
                        help="attention of the standard path and of the paths that name none (default sdpa: PyTorch's "
                             "best kernel; auto would be FA3 on an H100 with fa3-fwd installed)")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    registry = load_registry(args.lora_registry)
    requests = ([json.loads(line) for line in args.requests.read_text().splitlines() if line.strip()]
                if args.requests else DEFAULT_REQUESTS)
    paths = ["standard", *[p for p in args.paths.split(",") if p and p != "standard"]]
    settings = {path: path_settings(path, args.compile, args.attention) for path in paths}
    outputs: dict[str, list] = {}
    seconds: dict[str, float] = {}
    pipelines: dict[DiTOptions, PusaPipeline] = {}
    for path, (options, fields, decode_dtype) in settings.items():
        if options not in pipelines:  # quantizing is in place: one pipeline per set of DiT options
            pipelines.clear()
            pipelines[options] = PusaPipeline.from_preset(args.preset, args.device, options, registry)
            vaes = {None: pipelines[options].vae}
        pipe = pipelines[options]
        if decode_dtype not in vaes:  # a stage owns its VAE (it casts the decoder): one copy per decode type
            vaes[decode_dtype] = VAEStage(copy.deepcopy(vaes[None].vae), decode_dtype=decode_dtype)
        pipe.vae = vaes[decode_dtype]
        started = time.perf_counter()
        outputs[path] = []
        for request in requests:
            plan = plan_request(parse_request({**request, **fields}), pipe.preset, loras=registry)
            if plan.window_frames is not None:
                raise SystemExit("a long video (frames > window_frames) is not compared; ask for one window")
            outputs[path].append(render(pipe, plan))
        seconds[path] = time.perf_counter() - started

    rows = []
    for path in paths[1:]:
        for i, ((latents, frames), (ref_latents, ref_frames)) in enumerate(zip(outputs[path], outputs["standard"])):
            rows.append({"path": path, "request": i, **compare(frames, ref_frames, latents, ref_latents)})
    print(f"{args.preset}, {len(requests)} request(s); against the standard path:")
    print("| path | request | PSNR dB | SSIM | latent rel. diff | path s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['path']} | {row['request']} | {row['psnr_db']:.2f} | {row['ssim']:.4f} | "
              f"{row['latent_rel_diff']:.4f} | {seconds[row['path']]:.1f} |")
    if args.out:
        args.out.write_text(json.dumps({"preset": args.preset, "requests": requests, "rows": rows,
                                        "seconds": seconds}, indent=2))


if __name__ == "__main__":
    main()
