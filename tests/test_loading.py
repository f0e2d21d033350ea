"""Resolving model sources (local folders, s3:// prefixes on a real SeaweedFS server) and loading them."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from s3server import S3Server, running_s3_server, s3_server_fixture, use_test_credentials
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

from pusa_model.loading import MARKER, load_components, resolve_source
from pusa_model.presets import build_tiny_checkpoint

BUCKET = "pusa-models"
PREFIX = "some/prefix"
URI = f"s3://{BUCKET}/{PREFIX}"

s3_server = s3_server_fixture(scope="module")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    use_test_credentials(monkeypatch, tmp_path)
    monkeypatch.setenv("PUSA_CACHE_DIR", str(tmp_path / "default-cache"))


def upload(server: S3Server, folder: Path, bucket: str = BUCKET, prefix: str = PREFIX) -> None:
    """Upload `folder` under `prefix`, plus a folder placeholder and a sibling prefix that must not match."""
    client = server.client()
    client.create_bucket(Bucket=bucket)
    for path in files_under(folder):
        client.upload_file(str(folder / path), bucket, f"{prefix}/{path}")
    client.put_object(Bucket=bucket, Key=f"{prefix}/", Body=b"")
    client.put_object(Bucket=bucket, Key=f"{prefix}-decoy/not-mine.bin", Body=b"decoy")


@pytest.fixture(scope="module")
def uploaded(s3_server: S3Server, ckpt: Path) -> str:
    upload(s3_server, ckpt)
    return URI


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def assert_same_tree(copy: Path, source: Path) -> None:
    assert files_under(copy) == sorted([*files_under(source), MARKER])
    for rel in files_under(source):
        assert (copy / rel).read_bytes() == (source / rel).read_bytes(), rel


def assert_transformer_matches(transformer: WanTransformer3DModel, ckpt: Path) -> None:
    saved = load_file(str(ckpt / "transformer" / "diffusion_pytorch_model.safetensors"))
    state = transformer.state_dict()
    assert state.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name


def downloads(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("downloading ")]


def test_local_folder_loads_all_components(ckpt: Path) -> None:
    assert resolve_source(str(ckpt)) == ckpt
    parts = load_components(ckpt, torch.float32)
    assert isinstance(parts.tokenizer, PreTrainedTokenizerBase)
    assert parts.tokenizer("A cat walks on the grass").input_ids[-1] == parts.tokenizer.eos_token_id == 1
    assert isinstance(parts.text_encoder, UMT5EncoderModel)
    assert isinstance(parts.vae, AutoencoderKLWan)
    assert isinstance(parts.transformer, WanTransformer3DModel)
    for model in (parts.text_encoder, parts.vae, parts.transformer):
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
    assert_transformer_matches(parts.transformer, ckpt)


def test_load_components_dtypes_and_subset(ckpt: Path) -> None:
    parts = load_components(ckpt, torch.bfloat16, parts=("vae", "transformer"))
    assert parts.tokenizer is None and parts.text_encoder is None
    assert parts.transformer.dtype == torch.bfloat16
    assert parts.vae.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown parts"):
        load_components(ckpt, torch.float32, parts=("unet",))


def test_missing_local_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "nope"))):
        resolve_source(str(tmp_path / "nope"))


def test_s3_prefix_is_copied_and_loads(
    s3_server: S3Server, uploaded: str, ckpt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pusa_model.loading")
    cache = tmp_path / "cache"
    folder = resolve_source(uploaded, cache, s3_endpoint=s3_server.endpoint)
    assert folder.parent == cache / BUCKET / "some" and folder.name.startswith("prefix-")
    assert_same_tree(folder, ckpt)  # the placeholder and the sibling prefix were not copied
    marker = json.loads((folder / MARKER).read_text())
    assert marker["objects"] == len(files_under(ckpt)) and marker["source"] == uploaded
    assert len(downloads(caplog)) == 1
    parts = load_components(folder, torch.float32)
    assert_transformer_matches(parts.transformer, ckpt)

    # A partial copy left by a crashed run is discarded, not reused.
    other = tmp_path / "other-cache"
    stale = other / folder.relative_to(cache).with_name(folder.name + ".partial")
    (stale / "transformer").mkdir(parents=True)
    (stale / "transformer" / "config.json").write_text("{truncated")
    assert resolve_source(uploaded, other, s3_endpoint=s3_server.endpoint) == other / folder.relative_to(cache)
    assert not stale.exists()
    assert_same_tree(other / folder.relative_to(cache), ckpt)


CHILD = """
import logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s %(message)s")
from pusa_model.loading import MARKER, resolve_source
ready, go = Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.005)
folder = resolve_source(sys.argv[1])
print(folder, (folder / MARKER).is_file())
"""


def test_concurrent_resolves_download_once(
    s3_server: S3Server,
    uploaded: str,
    ckpt: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PUSA_S3_ENDPOINT", s3_server.endpoint)  # no cache_dir: PUSA_CACHE_DIR/models
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(4)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, uploaded, str(r), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in ready
    ]
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break  # a child died early: its stderr shows in the returncode check below
        time.sleep(0.01)
    go.touch()  # release all four at once
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in results]

    outputs = {out.strip() for out, _ in results}
    assert len(outputs) == 1, outputs  # same folder, and complete when each process got it
    path, complete = outputs.pop().rsplit(" ", 1)
    folder = Path(path)
    assert complete == "True"
    assert folder.is_relative_to(Path(os.environ["PUSA_CACHE_DIR"]) / "models" / BUCKET)
    assert_same_tree(folder, ckpt)
    logs = "".join(err for _, err in results)
    assert len(re.findall(r"pusa_model\.loading downloading ", logs)) == 1, logs
    assert len(re.findall(r"pusa_model\.loading downloaded ", logs)) == 1, logs

    caplog.set_level(logging.INFO, logger="pusa_model.loading")
    assert resolve_source(uploaded) == folder
    assert downloads(caplog) == []


def test_cached_copy_needs_no_server(ckpt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pusa_model.loading")
    with running_s3_server(tmp_path / "s3") as server:
        upload(server, ckpt)
        folder = resolve_source(URI, tmp_path / "cache", s3_endpoint=server.endpoint)
    assert len(downloads(caplog)) == 1
    with pytest.raises(EndpointConnectionError):
        server.client(config=Config(retries={"total_max_attempts": 1})).list_buckets()  # really gone
    assert resolve_source(URI, tmp_path / "cache", s3_endpoint=server.endpoint) == folder
    assert len(downloads(caplog)) == 1
    assert_same_tree(folder, ckpt)


def test_wrong_secret_key_is_rejected(
    s3_server: S3Server, uploaded: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
        resolve_source(uploaded, tmp_path / "cache", s3_endpoint=s3_server.endpoint)
    assert not list((tmp_path / "cache").rglob(MARKER))


@pytest.mark.parametrize("prefix", ["no/such/prefix", "some/pre"])  # "some/pre" only prefixes key names
def test_missing_prefix_names_the_uri(s3_server: S3Server, uploaded: str, tmp_path: Path, prefix: str) -> None:
    uri = f"s3://{BUCKET}/{prefix}"
    with pytest.raises(FileNotFoundError, match=re.escape(uri)):
        resolve_source(uri, tmp_path / "cache", s3_endpoint=s3_server.endpoint)
    assert not list((tmp_path / "cache").rglob(MARKER))


def test_s3_object_is_copied_once_as_a_file(s3_server: S3Server, uploaded: str, ckpt: Path, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """`resolve_file`: one object (e.g. a LoRA of the registry) copied once per node, under its own name."""
    from pusa_model.loading import resolve_file

    caplog.set_level(logging.INFO, logger="pusa_model.loading")
    uri = f"{uploaded}/pusa_v1.safetensors"
    path = resolve_file(uri, tmp_path / "cache", s3_endpoint=s3_server.endpoint)
    assert path.name == "pusa_v1.safetensors" and path.read_bytes() == (ckpt / "pusa_v1.safetensors").read_bytes()
    assert resolve_file(uri, tmp_path / "cache", s3_endpoint=s3_server.endpoint) == path
    assert len(downloads(caplog)) == 1  # the second resolve found the completed copy
    assert resolve_file(str(ckpt / "pusa_v1.safetensors")) == ckpt / "pusa_v1.safetensors"  # a local file as is
    with pytest.raises(FileNotFoundError, match="no object .*/missing.safetensors"):
        resolve_file(f"{uploaded}/missing.safetensors", tmp_path / "cache", s3_endpoint=s3_server.endpoint)
    with pytest.raises(ValueError, match="names no object"):
        resolve_file(f"{uploaded}/", tmp_path / "cache", s3_endpoint=s3_server.endpoint)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_file(str(tmp_path / "nope.safetensors"))
