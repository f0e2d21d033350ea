"""A manifest row as the HTTP API reads a request: the same `Submission` and `plan_request`, so a row
and a ``POST /v1/videos`` body mean the same video.

A batch runs one model, its preset's (`Preset.model`), as OpenAI's Batch API takes one model per input
file: a row that names no ``model`` runs on the batch's, and a row naming another model fails, naming the
field ``model``. (Unlike ``POST /v1/videos``, where a request without ``model`` means pusa-v1.)"""

from __future__ import annotations

from pusa_jobs.submission import MODEL_NAME, MODEL_NAMES, Submission
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
    if "model" in fields and sub.model != preset.model:
        raise InvalidRequest("model", f"this batch runs model {preset.model} (preset {preset.name}), not {sub.model!r}: "
                                      f"a batch runs one model")
    return plan_request(parse_request(data), preset, loras=registry), sub.media


def batch_model(rows: list[dict]) -> str:
    """The model a batch of `rows` runs: the one its rows name (`MODEL_NAME` when none names one). Rows
    naming two models are an `InvalidRequest` naming ``model`` (a name that is no model fails its own row)."""
    named = sorted({row["model"] for row in rows if row.get("model") in MODEL_NAMES})
    if len(named) > 1:
        raise InvalidRequest("model", f"the rows name models {' and '.join(named)}: a batch runs one model")
    return named[0] if named else MODEL_NAME
