"""Command-line options for a request's fields, read from `GenerationRequest` itself, so `pusa generate` and
`pusa client submit`/`extend` offer every field under the same flag with the same checks and help, and a
field added to the request appears in both.

Each field ``name`` becomes ``--name-with-dashes``: a choice for a ``Literal``, a comma-separated list for
a list of numbers, a number or text otherwise, left out (None) unless given, so the request's own default
applies. A few fields have a friendlier form instead (`SHORTHANDS`): ``--image`` (repeat) and ``--images``
for ``images``, ``--lora NAME[=ALPHA]`` (repeat) for ``loras``, ``--size WIDTHxHEIGHT`` beside ``--width``
and ``--height``, ``--fast`` for ``--mode fast`` and ``--pixel-positions`` for ``--positions-unit pixel``.
`add_model_option` adds ``--model``, the model a request runs on (not a field of the request itself).
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable, Iterable
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from .request_schema import GenerationRequest

SHORTHANDS = ("images", "loras")  # fields whose only flags are the friendlier forms below


def lora_choice(text: str) -> dict:
    """``NAME`` or ``NAME=ALPHA`` as a request's ``loras`` entry."""
    name, sep, alpha = text.partition("=")
    if not sep:
        return {"name": name}
    try:
        return {"name": name, "alpha": float(alpha)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME or NAME=ALPHA, got {text!r}") from None


def size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` as two integers."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    return width, height


def comma_list(kind: type) -> Callable[[str], list]:
    """A parser of ``1,2,3`` into a list of `kind`."""
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
    parse.__name__ = f"{kind.__name__} list"
    return parse


def _strip(annotation):
    """The annotation without ``None`` in a union and without ``Annotated``'s metadata."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            rest = [a for a in get_args(annotation) if a is not type(None)]
            if len(rest) != 1:
                return annotation
            annotation = rest[0]
        else:
            return annotation


def _argument(name: str, field: FieldInfo) -> dict:
    """`add_argument`'s keywords for one field."""
    annotation = _strip(field.annotation)
    default = field.get_default(call_default_factory=True)
    text = field.description or ""
    if not field.is_required() and default not in (None, [], "") and len(str(default)) <= 40:  # not Wan's long negative prompt
        text += f"{'; ' if text else ''}default {default}"
    kwargs: dict = {"help": text or None, "default": None, "dest": name}
    if get_origin(annotation) is Literal:
        kwargs["choices"] = get_args(annotation)
    elif get_origin(annotation) is list:
        kwargs["type"] = comma_list(_strip(get_args(annotation)[0]))
        kwargs["metavar"] = "A,B,..."
    elif annotation in (int, float, str):
        kwargs["type"] = annotation
    else:
        raise TypeError(f"no command-line form for the field {name!r} ({field.annotation})")
    if field.is_required():
        kwargs["required"] = True
    return kwargs


def add_request_options(parser: argparse.ArgumentParser, skip: Iterable[str] = ()) -> None:
    """Add a flag for every field of `GenerationRequest` but those in `skip`, and the shorthands."""
    skipped = set(skip)
    for name, field in GenerationRequest.model_fields.items():
        if name in skipped or name in SHORTHANDS:
            continue
        parser.add_argument("--" + name.replace("_", "-"), **_argument(name, field))
    if "images" not in skipped:
        parser.add_argument("--image", action="append", default=[], help="a conditioning image (repeat for keyframes)")
        parser.add_argument("--images", type=comma_list(str), default=[], help="conditioning images, comma-separated")
    if "loras" not in skipped:
        parser.add_argument("--lora", type=lora_choice, action="append", default=[], metavar="NAME[=ALPHA]",
                            help="a LoRA of the registry to fuse beside the Pusa LoRA (repeat for more)")
    if "width" not in skipped:
        parser.add_argument("--size", type=size, metavar="WIDTHxHEIGHT", help="width and height at once")
    if "mode" not in skipped:
        parser.add_argument("--fast", action="store_const", const="fast", dest="mode", help="--mode fast")
    if "positions_unit" not in skipped:
        parser.add_argument("--pixel-positions", action="store_const", const="pixel", dest="positions_unit",
                            help="--positions-unit pixel")


def add_model_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--model``: one of `MODEL_NAMES` (dest ``model``, None unless given)."""
    from .presets import MODEL_NAMES

    parser.add_argument("--model", choices=MODEL_NAMES, default=None, help=help)


def request_fields(args: argparse.Namespace, skip: Iterable[str] = ()) -> dict:
    """The request's fields given on the command line (those left out are absent, so their defaults apply)."""
    skipped = set(skip)
    fields = {name: getattr(args, name) for name in GenerationRequest.model_fields
              if name not in skipped and name not in SHORTHANDS and getattr(args, name, None) is not None}
    if "images" not in skipped and (args.image or args.images):
        fields["images"] = [*args.image, *args.images]
    if "loras" not in skipped and args.lora:
        fields["loras"] = args.lora
    if "width" not in skipped and args.size is not None:
        fields["width"], fields["height"] = args.size
    return fields
