"""Reading what a batch names: manifests (JSONL, CSV, Parquet) and media, from a local path, an
``s3://`` URI or (media) a data URL."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pyarrow.parquet as pq

from pusa_jobs.storage import open_store
from pusa_model.errors import InvalidRequest

MANIFEST_FORMATS = (".jsonl", ".json", ".csv", ".parquet")


def read_bytes(uri: str, base: str | None = None) -> bytes:
    """The bytes at `uri`: ``s3://bucket/key`` or a local path (relative ones against the folder `base`
    when it is local). `FileNotFoundError` when there is nothing there."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        folder, _, name = parsed.path.lstrip("/").rpartition("/")
        store = open_store(f"s3://{parsed.netloc}/{folder}" if folder else f"s3://{parsed.netloc}", create=False)
        try:
            return store.get(name)
        except KeyError:
            raise FileNotFoundError(uri) from None
    path = Path(parsed.path if parsed.scheme == "file" else uri)
    if not path.is_absolute() and base is not None and urlparse(base).scheme in ("", "file"):
        path = Path(urlparse(base).path if base.startswith("file:") else base) / path
    return path.read_bytes()


def parent(uri: str) -> str:
    """The folder (or ``s3://`` prefix) that holds `uri`."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return f"s3://{parsed.netloc}/{PurePosixPath(parsed.path.lstrip('/')).parent}".rstrip("/.")
    return str(Path(uri).resolve().parent)


def check_manifest_name(uri: str) -> str:
    """The manifest's format (its suffix); `ValueError` for one this reads not."""
    suffix = PurePosixPath(urlparse(uri).path).suffix.lower()
    if suffix not in MANIFEST_FORMATS:
        raise ValueError(f"manifest {uri}: expected one of {', '.join(MANIFEST_FORMATS)}")
    return suffix


def read_manifest(uri: str) -> list[dict]:
    """The manifest's rows as dicts, blank CSV cells left out; `ValueError` for an unknown format."""
    suffix = check_manifest_name(uri)
    data = read_bytes(uri)
    if suffix == ".parquet":
        rows = pq.read_table(io.BytesIO(data)).to_pylist()
    elif suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
    else:
        rows = []
        for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    rows.append({"_unreadable": f"line {number}: not JSON ({exc.msg})"})
    return [{k: v for k, v in row.items() if v is not None and v != ""} if isinstance(row, dict)
            else {"_unreadable": "not a JSON object"} for row in rows]


def media_bytes(value: object, field: str, base: str | None) -> object:
    """A media field's value as the API takes it: data URLs as they are, paths and ``s3://`` URIs read
    (paths relative to `base`); with `base` None only data URLs are taken."""
    if isinstance(value, dict) and "image_url" in value:
        value = value["image_url"]
    if not isinstance(value, str) or value.startswith("data:"):
        return value
    if value.startswith("video_"):
        raise InvalidRequest(field, "a batch names media by path, s3:// URI or data URL, not by video id")
    if base is None:
        raise InvalidRequest(field, "expected a data URL (data:<type>;base64,...)")
    try:
        return read_bytes(value, base)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise InvalidRequest(field, f"cannot read {value}: no such file") from None
