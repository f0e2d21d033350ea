"""Resolve a model source (a local folder or an ``s3://`` prefix) to a local folder, and load it.

An ``s3://bucket/prefix`` is copied once per node into a cache folder. Processes starting together
serialise on a lock file beside it; the copy is built in a temporary sibling and renamed into place
with a completion marker, so a folder is either complete or absent. No model hub is ever contacted.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pusa_model.presets import default_cache_dir

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

log = logging.getLogger(__name__)

MARKER = ".complete"
PARTS = ("tokenizer", "text_encoder", "vae", "transformer")
EXPERT_PARTS = ("transformer_2",)  # a two-expert model's second transformer (loaded when asked for)


def resolve_source(source: str, cache_dir: Path | None = None, *, s3_endpoint: str | None = None) -> Path:
    """Return a local folder holding `source`: the folder itself, or the node-local copy of an
    ``s3://bucket/prefix``, downloaded on first use into ``cache_dir/<bucket>/<prefix>-<hash>``.

    The S3 endpoint is `s3_endpoint`, else ``PUSA_S3_ENDPOINT``, else ``AWS_ENDPOINT_URL``, else
    boto3's default; credentials come from boto3's usual chain.
    """
    if not source.startswith("s3://"):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise ValueError(f"model folder {source} does not exist")
        return folder
    bucket, _, prefix = source.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        raise ValueError(f"no bucket in {source!r}")
    uri = f"s3://{bucket}/{prefix}"
    endpoint = _endpoint(s3_endpoint)
    digest = hashlib.sha256(f"{uri} {endpoint or ''}".encode()).hexdigest()[:12]
    name = f"{_relative(prefix, uri)}-{digest}" if prefix else digest
    target = Path(cache_dir or default_cache_dir() / "models") / bucket / name
    return fill_once(target, lambda partial: _download(uri, endpoint, partial))


def _endpoint(explicit: str | None) -> str | None:
    """The S3 endpoint: `explicit`, else ``PUSA_S3_ENDPOINT``, else ``AWS_ENDPOINT_URL`` (None: boto3's)."""
    return explicit or os.environ.get("PUSA_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")


def resolve_file(source: str, cache_dir: Path | None = None, *, s3_endpoint: str | None = None) -> Path:
    """Return a local path of the file `source`: the file itself, or the node-local copy of the object
    ``s3://bucket/key``, downloaded once into ``cache_dir/<bucket>/<key>-<hash>/`` (endpoint and
    credentials as for `resolve_source`)."""
    if not source.startswith("s3://"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError(f"file {source} does not exist")
        return path
    bucket, _, key = source.removeprefix("s3://").partition("/")
    if not bucket or not key or key.endswith("/"):
        raise ValueError(f"{source!r} names no object (expected s3://bucket/key)")
    endpoint = _endpoint(s3_endpoint)
    digest = hashlib.sha256(f"{source} {endpoint or ''}".encode()).hexdigest()[:12]
    relative = _relative(key, source)
    target = Path(cache_dir or default_cache_dir() / "models") / bucket / f"{relative}-{digest}"
    folder = fill_once(target, lambda partial: _download_object(bucket, key, endpoint, partial))
    return folder / relative.name


def _download_object(bucket: str, key: str, endpoint: str | None, folder: Path) -> dict:
    """Copy the object `key` into `folder` under its own file name; returns the completion marker."""
    import boto3
    from botocore.exceptions import ClientError

    uri = f"s3://{bucket}/{key}"
    log.info("downloading %s into %s", uri, folder)
    s3 = boto3.session.Session().client("s3", endpoint_url=endpoint)
    folder.mkdir(parents=True)
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            raise FileNotFoundError(f"no object {uri}" + (f" at {endpoint}" if endpoint else "")) from None
        raise
    s3.download_file(bucket, key, str(folder / Path(key).name))
    return {"source": uri, "endpoint": endpoint, "objects": 1, "bytes": head["ContentLength"],
            "etags": {Path(key).name: head["ETag"].strip('"')}}


def fill_once(target: Path, fill: Callable[[Path], dict]) -> Path:
    """Make `target` exactly once per node, safely when several processes ask at the same time.

    Under an exclusive lock beside `target`: if its completion marker exists, return at once;
    else `fill` a fresh ``.partial`` sibling (returning what the marker records) and rename it into
    place. A ``.partial`` left by a crashed process is thrown away first.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if (target / MARKER).is_file():
            return target
        partial = target.with_name(target.name + ".partial")
        if partial.exists():
            log.warning("removing %s left by an interrupted run", partial)
            shutil.rmtree(partial)
        marker = fill(partial)
        (partial / MARKER).write_text(json.dumps(marker, indent=1))
        if target.exists():  # an earlier copy whose marker was removed to force a fresh one
            shutil.rmtree(target)
        os.rename(partial, target)
    return target


def _relative(key: str, uri: str) -> Path:
    """`key` as a relative path, refusing one that would escape the folder it is joined to."""
    if key.startswith("/") or ".." in key.split("/"):
        raise ValueError(f"unsafe object path {key!r} under {uri}")
    return Path(key)


def _download(uri: str, endpoint: str | None, folder: Path) -> dict:
    """Copy every object under `uri` into `folder`; returns the completion marker's contents."""
    import boto3

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    key_prefix = f"{prefix}/" if prefix else ""
    log.info("downloading %s into %s", uri, folder)
    s3 = boto3.session.Session().client("s3", endpoint_url=endpoint)  # fresh credential lookup
    etags: dict[str, str] = {}
    size = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"].removeprefix(key_prefix)
            if not rel or rel.endswith("/"):  # folder placeholder objects
                continue
            dest = folder / _relative(rel, uri)
            dest.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(dest))
            etags[rel] = obj["ETag"].strip('"')
            size += obj["Size"]
    if not etags:
        raise FileNotFoundError(f"no objects under {uri}" + (f" at {endpoint}" if endpoint else ""))
    log.info("downloaded %d objects (%d bytes) from %s", len(etags), size, uri)
    return {"source": uri, "endpoint": endpoint, "objects": len(etags), "bytes": size, "etags": etags}


@dataclass
class Components:
    """The loaded parts of a checkpoint; a part not asked for is None."""

    tokenizer: PreTrainedTokenizerBase | None = None
    text_encoder: UMT5EncoderModel | None = None
    vae: AutoencoderKLWan | None = None
    transformer: WanTransformer3DModel | None = None
    transformer_2: WanTransformer3DModel | None = None


def load_components(
    folder: Path, dtype: torch.dtype, device: str = "cpu", parts: tuple[str, ...] = PARTS
) -> Components:
    """Load `parts` of the diffusers-layout checkpoint in `folder` from local files only.

    Models are in eval mode without gradients on `device`: the text encoder and transformer in
    `dtype`, the VAE in float32 (Wan's VAE runs in float32).
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    unknown = set(parts) - set(PARTS + EXPERT_PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)} (known: {', '.join(PARTS + EXPERT_PARTS)})")
    # Weights go from the files straight to `device` (no whole copy in host memory first).
    on = {"device_map": str(torch.device(device)), "local_files_only": True}
    loaders = {
        "tokenizer": lambda path: AutoTokenizer.from_pretrained(path, local_files_only=True),
        "text_encoder": lambda path: UMT5EncoderModel.from_pretrained(path, dtype=dtype, **on),
        "vae": lambda path: AutoencoderKLWan.from_pretrained(path, torch_dtype=torch.float32, **on),
        "transformer": lambda path: WanTransformer3DModel.from_pretrained(path, torch_dtype=dtype, **on),
    }
    loaders["transformer_2"] = loaders["transformer"]
    loaded = {}
    for name in parts:
        path = Path(folder) / name
        if not path.is_dir():
            raise FileNotFoundError(f"{path} does not exist (needed for the {name})")
        part = loaders[name](path)
        if isinstance(part, torch.nn.Module):
            part = part.eval().requires_grad_(False)
        loaded[name] = part
    return Components(**loaded)
