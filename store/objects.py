"""Object storage for blobs: one interface, a local-folder backend and an S3 backend."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from store.errors import ObjectIntegrityError, ObjectNotFoundError
from store.settings import StoreSettings

_CHUNK = 1 << 20
_TMP_MARK = ".tmp-"
BLOBS_ROOT = "blobs"


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def state_checksum(file_digests: Mapping[str, str]) -> str:
    """One sha256 for a whole state: over its sorted (file name, file sha256) pairs."""
    digest = hashlib.sha256()
    for name in sorted(file_digests):
        digest.update(f"{name}\0{file_digests[name]}\n".encode())
    return digest.hexdigest()


def validate_key(key: str) -> str:
    """A key is a relative '/'-separated path without '.', '..' or empty parts."""
    parts = key.split("/")
    if (
        not key
        or "\\" in key
        or "\0" in key
        or any(part in ("", ".", "..") for part in parts)
        or any(part.startswith(_TMP_MARK) for part in parts)
    ):
        raise ValueError(f"invalid object key {key!r}")
    return key


def _check(key: str, expected: str | None, actual: str) -> None:
    if expected is not None and actual != expected:
        raise ObjectIntegrityError(key, expected, actual)


class ObjectStore(ABC):
    """Blobs by key. Reads given an expected sha256 refuse content that does not match."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> str:
        """Store `data` at `key` (replacing it) and return its sha256."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> str:
        """Store the file at `path` under `key` and return its sha256."""

    @abstractmethod
    def put_stream(self, key: str, stream: IO[bytes]) -> str:
        """Store what `stream` yields, read in chunks (never whole), under `key`; return
        its sha256."""

    @abstractmethod
    def get_bytes(self, key: str, *, sha256: str | None = None) -> bytes: ...

    def get_file(self, key: str, dest: Path, *, sha256: str | None = None) -> str:
        """Write the object to `dest` (only if it matches `sha256`); return its sha256."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f"{_TMP_MARK}{dest.name}.", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as sink:
                self._download(key, sink)
            actual = sha256_file(tmp)
            _check(key, sha256, actual)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return actual

    @abstractmethod
    def _download(self, key: str, sink: IO[bytes]) -> None: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose key starts with `prefix`, in no particular order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; a missing key is not an error."""

    def delete_many(self, keys: Iterable[str]) -> int:
        count = 0
        for key in keys:
            self.delete(key)
            count += 1
        return count

    def delete_prefix(self, prefix: str) -> int:
        return self.delete_many([info.key for info in self.list(prefix)])


class LocalObjectStore(ObjectStore):
    """Objects as files under `root`. Writes go to a temporary name, then are renamed."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _write(self, key: str, source: bytes | Path | IO[bytes]) -> str:
        target = self._path(key)
        for attempt in range(2):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, tmp_name = tempfile.mkstemp(
                    prefix=f"{_TMP_MARK}{target.name}.", dir=target.parent
                )
                break
            except FileNotFoundError:
                # A concurrent delete pruned the empty folder between mkdir and mkstemp.
                if attempt:
                    raise
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                if isinstance(source, bytes):
                    out.write(source)
                    digest.update(source)
                elif isinstance(source, Path):
                    with source.open("rb") as src:
                        _copy(src, out, digest)
                else:
                    _copy(source, out, digest)
                out.flush()
                # The row that references this blob is committed right after; the blob
                # must survive a power cut as well as the row does.
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
        return digest.hexdigest()

    def put_bytes(self, key: str, data: bytes) -> str:
        return self._write(key, bytes(data))

    def put_file(self, key: str, path: Path) -> str:
        return self._write(key, Path(path))

    def put_stream(self, key: str, stream: IO[bytes]) -> str:
        return self._write(key, stream)

    def get_bytes(self, key: str, *, sha256: str | None = None) -> bytes:
        try:
            data = self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError(key) from None
        _check(key, sha256, sha256_bytes(data))
        return data

    def _download(self, key: str, sink: IO[bytes]) -> None:
        try:
            with self._path(key).open("rb") as src:
                shutil.copyfileobj(src, sink, _CHUNK)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Walk only the deepest folder that the prefix names completely.
        start = self.root.joinpath(*prefix.split("/")[:-1]) if "/" in prefix else self.root
        if not start.is_dir():
            return
        for dirpath, _dirnames, filenames in os.walk(start):
            for filename in filenames:
                if filename.startswith(_TMP_MARK):
                    continue
                path = Path(dirpath, filename)
                key = path.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                yield ObjectInfo(key, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC))

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Prune emptied folders, but keep the top-level ones ("versions", "tasks").
        parent = path.parent
        while parent != self.root and parent.parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


def _copy(source: IO[bytes], sink: IO[bytes], digest: Any) -> None:
    while chunk := source.read(_CHUNK):
        sink.write(chunk)
        digest.update(chunk)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class S3ObjectStore(ObjectStore):
    """Objects in an S3-compatible bucket (AWS, MinIO, moto), optionally under a key prefix."""

    def __init__(self, client: Any, bucket: str, *, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""

    def __repr__(self) -> str:
        return f"S3ObjectStore(bucket={self.bucket!r}, prefix={self.prefix!r})"

    @classmethod
    def from_settings(cls, settings: StoreSettings) -> S3ObjectStore:
        import boto3
        from botocore.config import Config

        if not settings.s3_bucket:
            raise ValueError("DMC_S3_BUCKET is required for the S3 object store")
        secret = settings.s3_secret_access_key
        client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=secret.get_secret_value() if secret else None,
            config=Config(
                s3={"addressing_style": settings.s3_addressing_style},
                retries={"max_attempts": 5, "mode": "standard"},
                connect_timeout=settings.s3_connect_timeout_seconds,
                read_timeout=settings.s3_read_timeout_seconds,
            ),
        )
        return cls(client, settings.s3_bucket, prefix=settings.s3_prefix)

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (for tests and fresh deployments)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError:
            pass
        region = self.client.meta.region_name
        if region in (None, "us-east-1"):
            self.client.create_bucket(Bucket=self.bucket)
        else:
            self.client.create_bucket(
                Bucket=self.bucket, CreateBucketConfiguration={"LocationConstraint": region}
            )

    def _full(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _missing(self, error: Exception) -> bool:
        code = getattr(error, "response", {}).get("Error", {}).get("Code")
        return code in ("NoSuchKey", "404", "NotFound")

    def put_bytes(self, key: str, data: bytes) -> str:
        digest = sha256_bytes(data)
        self.client.put_object(
            Bucket=self.bucket, Key=self._full(key), Body=bytes(data), Metadata={"sha256": digest}
        )
        return digest

    def put_file(self, key: str, path: Path) -> str:
        digest = sha256_file(Path(path))
        self.client.upload_file(
            str(path), self.bucket, self._full(key), ExtraArgs={"Metadata": {"sha256": digest}}
        )
        return digest

    def put_stream(self, key: str, stream: IO[bytes]) -> str:
        # The digest goes into the object's metadata, so it is needed before the upload:
        # spool the stream (to disk past a few chunks) while hashing it.
        digest = hashlib.sha256()
        with tempfile.SpooledTemporaryFile(max_size=4 * _CHUNK) as spool:
            _copy(stream, spool, digest)
            spool.seek(0)
            self.client.upload_fileobj(
                spool,
                self.bucket,
                self._full(key),
                ExtraArgs={"Metadata": {"sha256": digest.hexdigest()}},
            )
        return digest.hexdigest()

    def get_bytes(self, key: str, *, sha256: str | None = None) -> bytes:
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError as error:
            if self._missing(error):
                raise ObjectNotFoundError(key) from None
            raise
        data: bytes = response["Body"].read()
        _check(key, sha256, sha256_bytes(data))
        return data

    def _download(self, key: str, sink: IO[bytes]) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.download_fileobj(self.bucket, self._full(key), sink)
        except ClientError as error:
            if self._missing(error):
                raise ObjectNotFoundError(key) from None
            raise

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError as error:
            if self._missing(error):
                return False
            raise
        return True

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            for item in page.get("Contents", []):
                yield ObjectInfo(
                    key=item["Key"][len(self.prefix) :],
                    size=int(item["Size"]),
                    modified=item["LastModified"].astimezone(UTC),
                )

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._full(key))

    def delete_many(self, keys: Iterable[str]) -> int:
        full = [self._full(key) for key in keys]
        for start in range(0, len(full), 1000):
            batch = full[start : start + 1000]
            response = self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            if response.get("Errors"):
                first = response["Errors"][0]
                raise OSError(
                    f"S3 refused to delete {len(response['Errors'])} object(s), first "
                    f"{first.get('Key')!r}: {first.get('Message')}"
                )
        return len(full)


def make_object_store(settings: StoreSettings) -> ObjectStore:
    if settings.object_store == "s3":
        return S3ObjectStore.from_settings(settings)
    return LocalObjectStore(settings.objects_dir)


def content_key(sha256: str) -> str:
    """Where a blob is stored by its content: equal bytes, one object."""
    return f"{BLOBS_ROOT}/{sha256}"


def fresh_prefix(root: str) -> str:
    """A new, never used folder-like prefix under `root`, e.g. 'versions/3f2a.../'."""
    return f"{validate_key(root)}/{uuid.uuid4().hex}/"
