"""A manifest row as the HTTP API reads a request: the same `Submission` and `plan_request`, so a row
and a ``POST /v1/videos`` body mean the same video."""

from __future__ import annotations

from pusa_jobs.submission import MODEL_NAME, Submission
from pusa_model.errors import InvalidRequest
from pusa_model.loras import LoraRegistry
from pusa_model.presets import Preset
from pusa_model.request import GenerationPlan, parse_request, plan_request

from .sources import media_bytes

MEDIA_FIELDS = ("images", "input_reference", "video")
NOT_FOR_BATCH = ("webhook_url", "stream")


def read_row(fields: dict, preset: Preset, base: str | None,
             loras: LoraRegistry | None = None) -> tuple[GenerationPlan, dict[str, bytes]]:
    """A row's fields (its ``custom_id`` left out) checked and planned (its LoRAs resolved against the
    registry `loras`, none when None), and its media's bytes. Media are data URLs, or paths and ``s3://``
    URIs read from `base` (None: only data URLs are taken). `InvalidRequest` names the field at fault."""
    if "_unreadable" in fields:
        raise InvalidRequest(None, fields["_unreadable"])
    for name in NOT_FOR_BATCH:
        if name in fields:
            raise InvalidRequest(name, "not a batch field")
    sub = Submission()
    for name, value in fields.items():
        if name in MEDIA_FIELDS:
            values = value if isinstance(value, list) else [value]
            value = [media_bytes(v, f"{name}[{i}]" if name == "images" else name, base) for i, v in enumerate(values)]
            if name != "images":
                value = value[0]
        sub.fields[name] = [value]
    registry = loras if loras is not None else LoraRegistry()
    data = sub.generation_data()
    if sub.model != MODEL_NAME:
        raise InvalidRequest("model", f"a batch runs model {MODEL_NAME} only, not {sub.model!r}")
    return plan_request(parse_request(data), preset, loras=registry), sub.media
