"""A batch row's payload between the pipeline's stages: a pickled dict (its plan, media, timings and the
`State` its operations hand on), or the row's failure; and the record a finished row ends with."""

from __future__ import annotations

import pickle
from typing import Any


def pack(payload: dict) -> bytes:
    return pickle.dumps(payload, protocol=5)


def failed(custom_id: str, field: str | None, message: str) -> dict:
    return {"custom_id": custom_id, "status": "failed", "error": {"param": field, "message": message}}


def record_of(row: dict[str, Any]) -> dict:
    return pickle.loads(row["record"])
