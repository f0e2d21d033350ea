"""`pusa generate` (one video in this process, no Ray; or a request's plan with ``--dry-run``) and `pusa
checkpoint` (random weights at the real sizes). The `pusa` command (`pusa_cli`) runs them.

    pusa generate --task i2v --image in.png --prompt "..." -o out.mp4
    pusa generate --task t2v --prompt "..." --dry-run --json
    pusa generate --fast --lora-registry loras.yaml --prompt "..."      # 4 steps, guidance 1, distill LoRA
    pusa generate --model pusa-wan2.2 --prompt "..."                  # the tiny two-expert preset, tiny-wan2.2
    pusa checkpoint /models/pusa-random --device cuda                 # random weights at the real sizes
    pusa checkpoint /models/wan22-random --model pusa-wan2.2 --share-from /models/pusa-random --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ConfigError, InvalidRequest
from .request_options import add_model_option, add_request_options, request_fields


def build_parser() -> argparse.ArgumentParser:
    from .presets import PRESET_NAMES  # torch: imported by the commands that need it

    parser = argparse.ArgumentParser(prog="pusa", description="Pusa video generation (Pusa V1, Pusa-Wan2.2)")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate one video in this process")
    add_request_options(gen)  # every field of the request: --prompt, --task, --image, --steps, ...
    gen.add_argument("--lora-registry", type=Path, metavar="FILE",
                     help="YAML or JSON {name: {path, alpha, fast}}, as the service's app arg loras")
    gen.add_argument("--lora-base", choices=("disk", "cpu", "device"), default="disk",
                     help="where the base weights for LoRA fusing are kept")
    add_model_option(gen, "the model: picks its tiny preset (tiny, tiny-wan2.2) unless --preset names one, "
                          "which must be of this model; default pusa-v1")
    gen.add_argument("--preset", choices=PRESET_NAMES, help="the checkpoint (default: the model's tiny preset)")
    gen.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")
    gen.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (GPU)")
    gen.add_argument("--attention", default="auto",
                     help="attention kernel: auto, sdpa, auto_8bit, fa3, fa3_fp8, sage, flash, xformers, native, ...")
    gen.add_argument("-o", "--output", type=Path, default=Path("out.mp4"))
    gen.add_argument("--dry-run", action="store_true", help="validate and print the plan; run no model")
    gen.add_argument("--json", action="store_true", help="print machine-readable JSON")

    ckpt = sub.add_parser("checkpoint", help="write a random-weights checkpoint in the layout a model loads")
    ckpt.add_argument("dest", type=Path, help="folder to write (PUSA_MODEL_SOURCE for pusa-v1, PUSA_WAN22_SOURCE "
                                              "for pusa-wan2.2)")
    add_model_option(ckpt, "whose layout (default pusa-v1)")
    ckpt.add_argument("--share-from", type=Path, help="pusa-wan2.2: link the text encoder, tokenizer, VAE and both "
                                                      "experts from this pusa-v1 checkpoint; write only the LoRAs")
    ckpt.add_argument("--size", choices=("real", "tiny"), default="real",
                      help="real: Wan2.1-T2V-14B, UMT5-XXL and the Wan VAE; tiny: the tiny preset's sizes")
    ckpt.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda: seconds)")
    ckpt.add_argument("--layers", type=int, help="keep this many transformer blocks (default: all)")
    ckpt.add_argument("--pusa-rank", type=int, default=512, help="rank of the Pusa LoRA (released: 512)")
    ckpt.add_argument("--distill-rank", type=int, default=64, help="rank of the distill LoRA")
    return parser


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
    from .presets import MODEL_NAME
    from .random_checkpoint import write_random_checkpoint

    if args.dest.exists() and any(args.dest.iterdir()):
        raise ConfigError(f"{args.dest} is not empty")
    try:
        summary = write_random_checkpoint(args.dest, size=args.size, device=args.device, layers=args.layers,
                                          pusa_rank=args.pusa_rank, distill_rank=args.distill_rank,
                                          model=args.model or MODEL_NAME, share_from=args.share_from)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(json.dumps(summary))
    return 0


def preset_of(model: str | None, preset: str | None) -> str:
    """The preset `pusa generate` runs: `preset` when given, else the tiny preset of `model` (of pusa-v1
    without one)."""
    from .presets import MODEL_NAME, TINY_PRESETS

    return preset or TINY_PRESETS[model or MODEL_NAME]


def _generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .pipeline import PusaPipeline
    from .presets import get_preset
    from .request import parse_request, plan_request
    from .transformer import DiTOptions

    preset = get_preset(preset_of(args.model, args.preset))
    if args.model is not None and preset.model != args.model:
        raise InvalidRequest("model", f"--preset {preset.name} is of model {preset.model}, not {args.model}")
    registry = load_registry(args.lora_registry)
    plan = plan_request(parse_request(request_fields(args)), preset, loras=registry)
    if args.dry_run:
        print(json.dumps(plan.describe(), indent=None if args.json else 2))
        return 0
    inputs = [("video", plan.request.video)] if plan.request.video else []
    inputs += [(f"images[{i}]", path) for i, path in enumerate(plan.request.images)]
    for field, path in inputs:  # fail before the models load
        if not Path(path).is_file():
            raise InvalidRequest(field, f"file not found: {path}")
    options = DiTOptions(compile=args.compile, attention=args.attention)
    pipe = PusaPipeline.from_preset(preset.name, device=args.device, dit_options=options, loras=registry,
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
    """`pusa generate ...` or `pusa checkpoint ...` (`argv` starts with the command's name)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _checkpoint(args) if args.command == "checkpoint" else _generate(args)
    except (InvalidRequest, ConfigError) as exc:
        print(f"pusa: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
