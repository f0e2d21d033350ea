"""Blob stores: the same behaviour from a local folder and from S3 on a real SeaweedFS server."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from s3server import S3Server, s3_server_fixture, use_test_credentials

from pusa_jobs.storage import LocalStore, S3Store, Store, open_store

BUCKET = "pusa-store-test"

s3_server = s3_server_fixture(scope="module")


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    use_test_credentials(monkeypatch, tmp_path)


@pytest.fixture
def s3(s3_server: S3Server) -> S3Store:
    """An S3 store under a fresh prefix of a shared bucket."""
    return S3Store(BUCKET, f"tests/{uuid.uuid4().hex}", endpoint_url=s3_server.endpoint)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return request.getfixturevalue("s3")


def fetch(url: str) -> tuple[bytes, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read(), response.headers.get("Content-Type")


def test_put_get_exists_overwrite_delete(store: Store) -> None:
    assert not store.exists("a/b.bin")
    store.put("a/b.bin", b"\x00first\xff")
    assert store.exists("a/b.bin")
    assert store.get("a/b.bin") == b"\x00first\xff"
    store.put("a/b.bin", b"second")
    assert store.get("a/b.bin") == b"second"
    store.put("empty", b"")
    assert store.get("empty") == b""
    store.delete("a/b.bin")
    assert not store.exists("a/b.bin")
    store.delete("a/b.bin")  # missing: no error
    assert store.list("") == ["empty"]


def test_missing_key_raises_key_error(store: Store) -> None:
    store.put("a/b", b"x")
    for key in ("nope", "a/nope", "a"):  # "a" is only a folder
        with pytest.raises(KeyError) as info:
            store.get(key)
        assert info.value.args == (key,)
        assert not store.exists(key)


def test_list_and_delete_prefix(store: Store) -> None:
    for key in ("a/b", "a/c/d", "ab", "z/y"):
        store.put(key, key.encode())
    assert store.list("") == ["a/b", "a/c/d", "ab", "z/y"]
    assert store.list("a/") == ["a/b", "a/c/d"]
    assert store.list("a") == ["a/b", "a/c/d", "ab"]
    assert store.list("a/c/") == ["a/c/d"]
    assert store.list("missing/") == []
    store.delete_prefix("a/")
    assert store.list("") == ["ab", "z/y"]
    assert store.get("ab") == b"ab"
    store.delete_prefix("")
    assert store.list("") == []


@pytest.mark.parametrize("key", ["", "/abs", "../x", "a/../b", "a//b", "a/", ".hidden", "a/./b", "a\\b"])
def test_invalid_keys_rejected(store: Store, key: str) -> None:
    with pytest.raises(ValueError):
        store.put(key, b"x")
    with pytest.raises(ValueError):
        store.get(key)
    with pytest.raises(ValueError):
        store.exists(key)


def test_invalid_prefix_rejected(store: Store) -> None:
    for prefix in ("../", "a/../", "/etc/"):
        with pytest.raises(ValueError):
            store.list(prefix)


def test_s3_prefixes_isolate_stores(s3_server: S3Server, s3: S3Store) -> None:
    other = S3Store(BUCKET, f"{s3.prefix}-sibling", endpoint_url=s3_server.endpoint)
    s3.put("k", b"mine")
    other.put("k", b"theirs")
    assert s3.list("") == ["k"] and s3.get("k") == b"mine"
    raw = s3_server.client().get_object(Bucket=BUCKET, Key=f"{s3.prefix}/k")["Body"].read()
    assert raw == b"mine"
    s3.delete_prefix("")
    assert other.get("k") == b"theirs"


def test_s3_creates_missing_bucket(s3_server: S3Server) -> None:
    bucket = f"fresh-{uuid.uuid4().hex[:12]}"
    S3Store(bucket, "", endpoint_url=s3_server.endpoint).put("x", b"1")
    again = S3Store(bucket, "", endpoint_url=s3_server.endpoint)  # existing bucket: fine
    assert again.get("x") == b"1"
    assert again.uri == f"s3://{bucket}"


def test_s3_reads_credentials_afresh(s3_server: S3Server, s3: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(ClientError) as info:
        S3Store(BUCKET, s3.prefix, endpoint_url=s3_server.endpoint).put("k", b"x")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_s3_presigned_url_serves_bytes(s3: S3Store) -> None:
    s3.put("results/v.mp4", b"video bytes", "video/mp4")
    assert fetch(s3.url("results/v.mp4")) == (b"video bytes", "video/mp4")


def test_s3_tampered_signature_rejected(s3: S3Store) -> None:
    s3.put("k", b"secret")
    url = s3.url("k")
    start = url.index("X-Amz-Signature=") + len("X-Amz-Signature=")
    tampered = url[:start] + ("1" if url[start] == "0" else "0") + url[start + 1 :]
    with pytest.raises(urllib.error.HTTPError) as info:
        fetch(tampered)
    assert info.value.code == 403


def test_s3_expired_url_rejected(s3: S3Store) -> None:
    s3.put("k", b"secret")
    url = s3.url("k", expires_s=1)
    time.sleep(2)
    with pytest.raises(urllib.error.HTTPError) as info:
        fetch(url)
    assert info.value.code == 403


def test_local_url_is_none(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("k", b"x")
    assert store.url("k") is None


def test_open_store_s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSA_S3_ENDPOINT", s3_server.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # PUSA_S3_ENDPOINT wins
    store = open_store("s3://pusa-open/some/prefix/")
    assert isinstance(store, S3Store) and store.uri == "s3://pusa-open/some/prefix"
    store.put("k", b"v")
    assert s3_server.client().get_object(Bucket="pusa-open", Key="some/prefix/k")["Body"].read() == b"v"
    monkeypatch.delenv("PUSA_S3_ENDPOINT")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    assert open_store(store.uri).get("k") == b"v"


def test_open_store_local(tmp_path: Path) -> None:
    folder = tmp_path / "with space" / "store"
    by_uri = open_store(folder.as_uri())
    assert isinstance(by_uri, LocalStore) and folder.is_dir()
    by_uri.put("a/b", b"x")
    by_path = open_store(str(folder))
    assert by_path.get("a/b") == b"x"
    assert open_store(by_path.uri).get("a/b") == b"x"
    with pytest.raises(ValueError):
        open_store("http://example.com/store")


def test_local_writes_are_atomic(tmp_path: Path) -> None:
    """A reader never sees a partial value while a writer keeps replacing a large one."""
    store = LocalStore(tmp_path)
    values = [bytes([i]) * (4 << 20) for i in range(2)]
    store.put("big", values[0])
    done = threading.Event()
    seen: list[bytes] = []

    def read() -> None:
        while not done.is_set():
            data = store.get("big")
            if data not in values:
                seen.append(data[:16] + b"... %d bytes" % len(data))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(40):
            store.put("big", values[i % 2])
    finally:
        done.set()
        reader.join()
    assert seen == []
    assert store.list("") == ["big"]  # no temporary files left or listed


def test_reading_from_a_missing_bucket_creates_nothing(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch):
    """A batch manifest or input read from s3:// names a bucket that does not exist: FileNotFoundError, and the
    user's storage is left as it was (no bucket made by a read)."""
    from pusa_batch.sources import read_bytes

    monkeypatch.setenv("PUSA_S3_ENDPOINT", s3_server.endpoint)
    bucket = f"missing-{uuid.uuid4().hex[:12]}"
    with pytest.raises(FileNotFoundError):
        read_bytes(f"s3://{bucket}/batches/manifest.jsonl")
    with pytest.raises(FileNotFoundError):
        read_bytes(f"s3://{bucket}/manifest.jsonl")
    names = {b["Name"] for b in s3_server.client().list_buckets()["Buckets"]}
    assert bucket not in names
    open_store(f"s3://{bucket}/out")  # a store written to still makes its bucket
    assert bucket in {b["Name"] for b in s3_server.client().list_buckets()["Buckets"]}
