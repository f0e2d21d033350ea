"""A job's submission: one create or extend request's body in OpenAI's video shape (JSON fields, the
SDK's ``name[key]`` object fields, data URLs, ``size`` and ``seconds``) split into generation
parameters, media bytes and the job options that are not generation parameters (``webhook_url``).

The HTTP API reads one off the wire (`deployments.openai_api.read_submission`) and a batch reads one from
each manifest row (`pusa_batch.rows.read_row`), so a row and a ``POST /v1/videos`` body mean the same video.
"""

from __future__ import annotations

import base64
import binascii
import math

from pusa_model.errors import InvalidRequest
from pusa_model.presets import MODEL_NAME, MODEL_NAMES, WAN22_MODEL_NAME  # noqa: F401 (the names' home is presets)
from pusa_model.request_schema import MAX_FRAMES, MAX_SIDE, SIZE_MULTIPLE

LIST_FIELDS = ("images", "positions", "multipliers", "extension_multipliers")
JOB_OPTIONS = ("webhook_url",)  # fields about the job rather than the video


def _decode_data_url(value: str, field: str) -> bytes:
    """``data:<type>;base64,<payload>`` -> bytes."""
    if not value.startswith("data:") or ";base64," not in value:
        raise InvalidRequest(field, "expected an upload or a base64 data URL (data:<type>;base64,...)")
    try:
        return base64.b64decode(value.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(field, "the data URL is not valid base64") from None


def _number(value: object, field: str) -> float:
    """A finite number (or its decimal string) as float, else `InvalidRequest` naming `field`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidRequest(field, "expected a number")
    try:
        number = float(value)
    except ValueError:
        raise InvalidRequest(field, "expected a number") from None
    if not math.isfinite(number):
        raise InvalidRequest(field, "expected a finite number")
    return number


def _as_list(field: str, values: list) -> list:
    """Form values (repeated, or one comma-separated string) or a JSON list, as one list."""
    if len(values) == 1 and isinstance(values[0], list):
        return values[0]
    if len(values) == 1 and isinstance(values[0], str) and field != "images":
        return [v.strip() for v in values[0].split(",") if v.strip()]
    return values


class Submission:
    """A create/extend request split into generation parameters, media bytes and job options."""

    def __init__(self) -> None:
        self.model = MODEL_NAME  # the request's `model`, set by `generation_data`
        self.fields: dict[str, list] = {}
        self.media: dict[str, bytes] = {}
        self.options: dict[str, object] = {}

    def _media(self, field: str, value, index: int | None = None) -> str:
        """Keep an upload or data URL as media; return its field name for the request."""
        name = field if index is None else f"{field}[{index}]"
        if isinstance(value, dict) and "image_url" in value:  # OpenAI's image reference object
            value = value["image_url"]
        self.media[name] = value if isinstance(value, bytes) else _decode_data_url(str(value), name)
        return name

    def generation_data(self) -> dict:
        """The fields as `GenerationRequest` data, media replaced by their field names; the request's
        ``model`` (one of `MODEL_NAMES`) goes to `self.model`, whether a deployment serves it is its own check."""
        data: dict = {}
        for key, values in self.fields.items():
            data[key] = _as_list(key, values) if key in LIST_FIELDS else values[-1]
        model = data.pop("model", MODEL_NAME)
        if model not in MODEL_NAMES:
            raise InvalidRequest("model", f"unknown model {model!r} (known: {', '.join(MODEL_NAMES)})")
        self.model = model
        if "size" in data:
            size = str(data.pop("size"))
            try:
                data["width"], data["height"] = (int(v) for v in size.lower().split("x"))
            except ValueError:
                raise InvalidRequest("size", "expected WIDTHxHEIGHT, e.g. 832x480") from None
            for side in (data["width"], data["height"]):  # checked here so the error names `size`
                if side % SIZE_MULTIPLE or not SIZE_MULTIPLE <= side <= MAX_SIDE:
                    raise InvalidRequest("size", f"width and height must be multiples of {SIZE_MULTIPLE} "
                                                 f"from {SIZE_MULTIPLE} to {MAX_SIDE}, got {size}")
        if "seconds" in data:
            seconds = _number(data.pop("seconds"), "seconds")
            if not 0 < seconds <= 60:
                raise InvalidRequest("seconds", f"expected a duration from 0 to 60 seconds, got {seconds:g}")
            if "frames" not in data:
                fps = data.get("fps", 25)
                if not isinstance(fps, (int, str)) or not str(fps).isdigit() or not 1 <= int(fps) <= 60:
                    raise InvalidRequest("fps", "expected a whole number of frames per second from 1 to 60")
                data["frames"] = 4 * max(0, round(seconds * int(fps) / 4)) + 1
                if data["frames"] > MAX_FRAMES:
                    raise InvalidRequest("seconds", f"at {fps} fps a video may last {MAX_FRAMES / int(fps):.2f} s at most")
        reference = data.pop("input_reference", None)
        if reference is not None:
            data.setdefault("task", "i2v")
            data["images"] = [reference]
        if "images" in data:
            data["images"] = [self._media("images", v, i) for i, v in enumerate(data["images"])]
        if isinstance(data.get("video"), (bytes, str)) and not str(data.get("video", "")).startswith("video_"):
            data["video"] = self._media("video", data["video"])
        return data
