"""`pusa`: generate a video in this process (no Ray), or print a request's plan; `pusa batch` runs a
manifest on Ray (`pusa_batch`); `pusa client` calls a running service's HTTP API (`pusa_client`).

    pusa generate --task i2v --image in.png --prompt "..." -o out.mp4
    pusa generate --task t2v --prompt "..." --dry-run --json
    pusa generate --fast --lora-registry loras.yaml --prompt "..."      # 4 steps, guidance 1, distill LoRA
    pusa checkpoint /models/pusa-random --device cuda                 # random weights at the real sizes
    pusa batch requests.jsonl --output out/
    pusa client submit --prompt "..." --wait -o out.mp4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ConfigError, InvalidRequest


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def lora_choice(text: str) -> dict:
    """``NAME`` or ``NAME=ALPHA`` as a request's ``loras`` entry."""
    name, sep, alpha = text.partition("=")
    if not sep:
        return {"name": name}
    try:
        return {"name": name, "alpha": float(alpha)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME or NAME=ALPHA, got {text!r}") from None


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    return width, height


def build_parser() -> argparse.ArgumentParser:
    from .presets import PRESET_NAMES  # torch: imported by the commands that need it, not by `pusa client`
    from .request import TASKS

    parser = argparse.ArgumentParser(prog="pusa", description="Pusa V1 video generation")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate one video in this process")
    gen.add_argument("--task", choices=TASKS, default="t2v")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--image", action="append", default=[], help="conditioning image (repeat for keyframes)")
    gen.add_argument("--images", type=lambda s: s.split(","), default=[], help="comma-separated images")
    gen.add_argument("--video", help="conditioning video (v2v)")
    gen.add_argument("--v2v-mode", choices=("completion", "extension"), default="completion")
    gen.add_argument("--positions", type=_int_list, help="latent frame indices, e.g. 0,20")
    gen.add_argument("--pixel-positions", action="store_true", help="--positions are pixel frame indices")
    gen.add_argument("--multipliers", type=_float_list, help="noise multiplier per position, e.g. 0.2,0.5")
    gen.add_argument("--noise-multiplier", type=float)
    gen.add_argument("--size", type=_size, help="WIDTHxHEIGHT, multiples of 16 (preset default)")
    gen.add_argument("--frames", type=int, help="4k+1 (preset default); more than a window makes a long video")
    gen.add_argument("--window-frames", type=int, help="frames of one window of a long video (default 81)")
    gen.add_argument("--extension-multipliers", type=_float_list,
                     help="noise multipliers of the 4 latent frames each later window takes from the one before")
    gen.add_argument("--fps", type=int, default=25)
    gen.add_argument("--steps", type=int, help="denoising steps (default 10; 4 with --fast)")
    gen.add_argument("--guidance", type=float, help="guidance scale (default 5; 1 with --fast)")
    gen.add_argument("--lora-alpha", type=float, help="strength of the Pusa LoRA, 0.1 to 5 (default 1.4)")
    gen.add_argument("--fast", action="store_true",
                     help="mode fast: 4 steps at guidance 1 with the registry's fast (distill) LoRA")
    gen.add_argument("--lora", type=lora_choice, action="append", default=[], metavar="NAME[=ALPHA]",
                     help="a LoRA of --lora-registry to fuse beside the Pusa LoRA (repeat for more)")
    gen.add_argument("--lora-registry", type=Path, metavar="FILE",
                     help="YAML or JSON {name: {path, alpha, fast}}, as the service's app arg loras")
    gen.add_argument("--lora-base", choices=("disk", "cpu", "device"), default="disk",
                     help="where the base weights for LoRA fusing are kept")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--preset", choices=PRESET_NAMES, default="tiny")
    gen.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")
    gen.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (GPU)")
    gen.add_argument("--attention", default="auto", help="attention kernel: auto, native, flash, xformers, ...")
    gen.add_argument("-o", "--output", type=Path, default=Path("out.mp4"))
    gen.add_argument("--dry-run", action="store_true", help="validate and print the plan; run no model")
    gen.add_argument("--json", action="store_true", help="print machine-readable JSON")

    ckpt = sub.add_parser("checkpoint", help="write a random-weights checkpoint in the layout pusa-v1 loads")
    ckpt.add_argument("dest", type=Path, help="folder to write (PUSA_MODEL_SOURCE for --preset pusa-v1)")
    ckpt.add_argument("--size", choices=("real", "tiny"), default="real",
                      help="real: Wan2.1-T2V-14B, UMT5-XXL and the Wan VAE; tiny: the tiny preset's sizes")
    ckpt.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda: seconds)")
    ckpt.add_argument("--layers", type=int, help="keep this many transformer blocks (default: all)")
    ckpt.add_argument("--pusa-rank", type=int, default=512, help="rank of the Pusa LoRA (released: 512)")
    ckpt.add_argument("--distill-rank", type=int, default=64, help="rank of the distill LoRA")
    return parser


def request_from_args(args: argparse.Namespace) -> dict:
    data = {
        "task": args.task,
        "prompt": args.prompt,
        "images": [*args.image, *args.images],
        "video": args.video,
        "v2v_mode": args.v2v_mode,
        "positions": args.positions,
        "positions_unit": "pixel" if args.pixel_positions else "latent",
        "multipliers": args.multipliers,
        "noise_multiplier": args.noise_multiplier,
        "frames": args.frames,
        "window_frames": args.window_frames,
        "extension_multipliers": args.extension_multipliers,
        "fps": args.fps,
        "seed": args.seed,
        "loras": args.lora,
    }
    for name in ("steps", "guidance", "lora_alpha"):  # left out: the request's (or mode fast's) default
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)
    if args.fast:
        data["mode"] = "fast"
    if args.negative_prompt is not None:
        data["negative_prompt"] = args.negative_prompt
    if args.size:
        data["width"], data["height"] = args.size
    return data


def load_registry(path: Path | None):
    """The LoRA registry of `--lora-registry` (empty without one); a bad file is a `ConfigError`."""
    import yaml
    from pydantic import ValidationError

    from .loras import LoraRegistry

    if path is None:
        return LoraRegistry()
    try:
        return LoraRegistry.model_validate(yaml.safe_load(path.read_text()) or {})
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"--lora-registry {path}: {exc}") from None


def _checkpoint(args: argparse.Namespace) -> int:
    from .random_checkpoint import write_random_checkpoint

    if args.dest.exists() and any(args.dest.iterdir()):
        raise ConfigError(f"{args.dest} is not empty")
    summary = write_random_checkpoint(args.dest, size=args.size, device=args.device, layers=args.layers,
                                      pusa_rank=args.pusa_rank, distill_rank=args.distill_rank)
    print(json.dumps(summary))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .pipeline import PusaPipeline
    from .presets import get_preset
    from .request import parse_request, plan_request
    from .transformer import DiTOptions

    preset = get_preset(args.preset)
    registry = load_registry(args.lora_registry)
    plan = plan_request(parse_request(request_from_args(args)), preset, loras=registry)
    if args.dry_run:
        print(json.dumps(plan.describe(), indent=None if args.json else 2))
        return 0
    inputs = [("video", plan.request.video)] if plan.request.video else []
    inputs += [(f"images[{i}]", path) for i, path in enumerate(plan.request.images)]
    for field, path in inputs:  # fail before the models load
        if not Path(path).is_file():
            raise InvalidRequest(field, f"file not found: {path}")
    options = DiTOptions(compile=args.compile, attention=args.attention)
    pipe = PusaPipeline.from_preset(args.preset, device=args.device, dit_options=options, loras=registry,
                                    lora_base=args.lora_base)
    with tqdm(total=plan.request.steps * len(plan.windows), desc="denoising", unit="step", disable=args.json) as bar:
        result = pipe.generate(plan, args.output, on_step=lambda event: bar.update(1))
    summary = {
        "video": str(result.video_path),
        "thumbnail": str(result.thumbnail_path),
        "seed": plan.seed,
        "timings_s": {k: round(v, 3) for k, v in result.timings_s.items()},
    }
    print(json.dumps(summary) if args.json else f"wrote {result.video_path} (seed {plan.seed})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["batch"]:  # Ray Data's batch path, outside this Ray-free package
        from pusa_batch.cli import main as batch_main

        return batch_main(argv[1:])
    if argv[:1] == ["client"]:  # the HTTP API's client: no model, no Ray
        from pusa_client.cli import main as client_main

        return client_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return _checkpoint(args) if args.command == "checkpoint" else _generate(args)
    except (InvalidRequest, ConfigError) as exc:
        print(f"pusa: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
