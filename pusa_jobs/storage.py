"""Blob stores that every router replica and the VAE deployment see: a local folder or S3."""

from __future__ import annotations

import abc
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

# S3 error codes that mean "try again later" rather than "this request is wrong"
_RETRYABLE_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"})


class StoreUnavailable(OSError):
    """The store could not be reached, or answered with a server error: worth retrying later."""


def check_key(key: str) -> str:
    """Return `key` if it is a relative `/`-separated key with no empty, `.` or dot-led segments."""
    if not key or key.startswith("/") or "\\" in key:
        raise ValueError(f"invalid store key {key!r}: must be relative, non-empty, with no backslashes")
    for part in key.split("/"):
        if not part or part.startswith("."):
            raise ValueError(f"invalid store key {key!r}: segment {part!r} is empty or starts with '.'")
    return key


def check_prefix(prefix: str) -> str:
    """Return `prefix` if its folder part (up to the last `/`) is a valid key or empty."""
    folder = prefix.rpartition("/")[0]
    if folder or prefix.startswith("/"):
        check_key(folder)
    return prefix


class Store(abc.ABC):
    """Bytes under string keys; keys are `/`-separated (see `check_key`)."""

    @property
    @abc.abstractmethod
    def uri(self) -> str:
        """The URI that `open_store` turns back into this store."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Write `data` under `key`, replacing any previous value atomically."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The value under `key`; `KeyError(key)` if there is none."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether a value is stored under `key`."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; nothing happens if it is missing."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys starting with `prefix` (a plain string prefix, as in S3), sorted."""

    def delete_prefix(self, prefix: str) -> None:
        """Remove every key starting with `prefix`."""
        for key in self.list(prefix):
            self.delete(key)

    @abc.abstractmethod
    def url(self, key: str, expires_s: int = 3600) -> str | None:
        """A URL that serves `key` to anyone for `expires_s` seconds, or None if the store has none."""


class LocalStore(Store):
    """Files under a root folder; writes go to a temporary file and are renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def uri(self) -> str:
        return self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        path = self._path(key)
        while True:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
                break
            except FileNotFoundError:  # a concurrent delete pruned the folder between the two calls
                continue
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return
        for folder in path.parents:  # prune folders left empty, up to the root
            if folder == self.root:
                break
            try:
                folder.rmdir()
            except OSError:
                break

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / check_prefix(prefix).rpartition("/")[0]
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if not name.startswith(".") and key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def url(self, key: str, expires_s: int = 3600) -> str | None:
        check_key(key)
        return None


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


@contextmanager
def _unavailable_as_such(uri: str) -> Iterator[None]:
    """Raise connection failures and S3 server errors as `StoreUnavailable`."""
    try:
        yield
    except (BotoConnectionError, HTTPClientError) as e:
        raise StoreUnavailable(f"{uri}: {e}") from e
    except ClientError as e:
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if status >= 500 or _error_code(e) in _RETRYABLE_CODES:
            raise StoreUnavailable(f"{uri}: {e}") from e
        raise


class S3Store(Store):
    """Objects under `prefix` in an S3 bucket (any S3-compatible endpoint), created if missing (unless `create` is
    False: a store only read from must not create anything in the user's storage).

    Presigned URLs are signed for `public_endpoint` (the address clients reach the store at, e.g. behind
    a load balancer) when given, else for the endpoint the service uses."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str | None = None,
                 public_endpoint: str | None = None, create: bool = True):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        # A fresh session looks credentials up again; the default session caches them for the process.
        session = boto3.session.Session()
        self.client = self._client(session, endpoint_url, region)
        self.signer = self._client(session, public_endpoint, region) if public_endpoint else self.client
        if create:
            self._ensure_bucket()

    @staticmethod
    def _client(session: boto3.session.Session, endpoint_url: str | None, region: str | None):
        config = Config(signature_version="s3v4", s3={"addressing_style": "path"} if endpoint_url else None)
        return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)

    def _ensure_bucket(self) -> None:
        with self._reachable():
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as e:
                if _error_code(e) not in ("404", "NoSuchBucket", "NotFound"):
                    raise
            region = self.client.meta.region_name
            kwargs = {}
            if region and region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
            try:
                self.client.create_bucket(Bucket=self.bucket, **kwargs)
            except ClientError as e:
                if _error_code(e) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _reachable(self):
        return _unavailable_as_such(self.uri)

    def _object(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        with self._reachable():
            self.client.put_object(Bucket=self.bucket, Key=self._object(key), Body=data, **extra)

    def get(self, key: str) -> bytes:
        with self._reachable():
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._object(key))
            except ClientError as e:
                if _error_code(e) in ("NoSuchKey", "NoSuchBucket", "404", "NotFound"):
                    raise KeyError(key) from None
                raise
            with response["Body"] as body:
                return body.read()

    def exists(self, key: str) -> bool:
        with self._reachable():
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._object(key))
                return True
            except ClientError as e:
                if _error_code(e) in ("NoSuchKey", "404", "NotFound"):
                    return False
                raise

    def delete(self, key: str) -> None:
        with self._reachable():
            self.client.delete_object(Bucket=self.bucket, Key=self._object(key))

    def _objects(self, prefix: str) -> list[str]:
        check_prefix(prefix)
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        names = []
        with self._reachable():
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                names.extend(item["Key"] for item in page.get("Contents", []))
        return names

    def list(self, prefix: str = "") -> list[str]:
        cut = len(self.prefix) + 1 if self.prefix else 0
        return sorted(name[cut:] for name in self._objects(prefix))

    def delete_prefix(self, prefix: str) -> None:
        names = self._objects(prefix)
        with self._reachable():
            for start in range(0, len(names), 1000):
                batch = [{"Key": name} for name in names[start : start + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def url(self, key: str, expires_s: int = 3600) -> str | None:
        return self.signer.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._object(key)}, ExpiresIn=expires_s
        )


def open_store(uri: str, create: bool = True) -> Store:
    """`s3://bucket/prefix` -> `S3Store`; `file:///abs/path` or a plain path -> `LocalStore` (created). With
    `create` False a missing S3 bucket is not created (for stores only read from).

    The S3 endpoint is ``PUSA_S3_ENDPOINT``, else ``AWS_ENDPOINT_URL``, else boto3's default; presigned
    URLs use ``PUSA_S3_PUBLIC_ENDPOINT`` when set; credentials and region come from boto3's usual chain.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"store URI {uri!r} names no bucket")
        endpoint = os.environ.get("PUSA_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
        return S3Store(parsed.netloc, parsed.path, endpoint_url=endpoint,
                       public_endpoint=os.environ.get("PUSA_S3_PUBLIC_ENDPOINT"), create=create)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"store URI {uri!r} names a remote host")
        return LocalStore(Path(url2pathname(parsed.path)))
    if parsed.scheme:
        raise ValueError(f"unsupported store URI {uri!r}: use s3://bucket/prefix, file:///path or a path")
    return LocalStore(Path(uri))
