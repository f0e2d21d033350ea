"""A batch's output prefix (a folder or ``s3://``): per row ``videos/<custom_id>.mp4``,
``thumbnails/<custom_id>.webp`` and, written last, ``rows/<custom_id>.json``; at the end
``output.jsonl`` and ``errors.jsonl`` in manifest order; ``status.json`` while it runs.

A row is complete when its record says ``completed``: its video and thumbnail were stored before it.
A re-run skips complete rows and redoes the rest, writing to the same keys (no duplicates).
"""

from __future__ import annotations

import json
import re
from pusa_jobs.storage import Store, open_store

CUSTOM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class BatchOutputs:
    """The output prefix of one batch."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self.store: Store = open_store(self.uri)

    def _uri(self, key: str) -> str:
        return f"{self.uri}/{key}"

    def write_result(self, custom_id: str, video: bytes, thumbnail: bytes) -> dict[str, str]:
        """Store a row's files; returns their URIs."""
        keys = {"video": f"videos/{custom_id}.mp4", "thumbnail": f"thumbnails/{custom_id}.webp"}
        self.store.put(keys["video"], video, "video/mp4")
        self.store.put(keys["thumbnail"], thumbnail, "image/webp")
        return {name: self._uri(key) for name, key in keys.items()}

    def write_record(self, record: dict) -> None:
        self.store.put(f"rows/{record['custom_id']}.json", json.dumps(record).encode(), "application/json")

    def records(self) -> dict[str, dict]:
        """Every row record written so far, by custom_id."""
        found = {}
        for key in self.store.list("rows/"):
            record = json.loads(self.store.get(key))
            found[record["custom_id"]] = record
        return found

    def write_manifests(self, records: list[dict]) -> tuple[int, int]:
        """``output.jsonl`` (`records`, in manifest order) and ``errors.jsonl`` (the failed ones); returns
        how many rows completed and failed."""
        failed = [r for r in records if r["status"] != "completed"]
        self.store.put("output.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode(), "application/jsonl")
        self.store.put("errors.jsonl", "".join(json.dumps(r) + "\n" for r in failed).encode(), "application/jsonl")
        return len(records) - len(failed), len(failed)

    def write_status(self, status: dict) -> None:
        self.store.put("status.json", json.dumps(status).encode(), "application/json")
