"""Small objects (manifest, reports, run claims) with atomic and conditional writes.

S3 uses boto3: a PUT is atomic, ``IfNoneMatch='*'`` creates only if absent and ``IfMatch=<etag>`` replaces only
the version that was read (compare-and-swap). Locally the same contract comes from a temporary file plus
``os.link`` (create-if-absent) or ``os.replace``, with compare-and-swap serialised by ``flock`` on the folder.
Paths are filesystem paths as pyarrow spells them: ``bucket/key`` for S3, absolute paths locally.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Protocol

from labelnext.ops.s3 import S3Settings, delete_below, split_key


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI."""


class PreconditionFailed(RuntimeError):
    """A conditional write lost: the object exists (create) or changed since it was read (swap)."""


@dataclass(frozen=True)
class Stored:
    data: bytes
    tag: str  # ETag on S3, content hash locally: what a later compare-and-swap must match


class ObjectStore(Protocol):
    def get(self, path: str) -> Optional[Stored]: ...

    def put(self, path: str, data: bytes, *, if_absent: bool = False, if_tag: Optional[str] = None,
            content_type: Optional[str] = None) -> str: ...

    def delete(self, path: str) -> None: ...

    def delete_prefix(self, path: str) -> None: ...


class S3Objects:
    def __init__(self, settings: S3Settings):
        self.settings = settings
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self.settings.client()
        return self._client

    def get(self, path: str) -> Optional[Stored]:
        bucket, key = split_key(path)
        with _named(path):
            try:
                resp = self.client.get_object(Bucket=bucket, Key=key)
            except self.client.exceptions.NoSuchKey:
                return None
            return Stored(resp["Body"].read(), resp["ETag"])

    def put(self, path: str, data: bytes, *, if_absent: bool = False, if_tag: Optional[str] = None,
            content_type: Optional[str] = None) -> str:
        from botocore.exceptions import ClientError

        bucket, key = split_key(path)
        args: dict[str, Any] = dict(self.settings.put_args())
        if if_absent:
            args["IfNoneMatch"] = "*"
        if if_tag is not None:
            args["IfMatch"] = if_tag
        if content_type:
            args["ContentType"] = content_type
        with _named(path):
            try:
                resp = self.client.put_object(Bucket=bucket, Key=key, Body=data, **args)
            except ClientError as exc:
                # 412 PreconditionFailed; 409 ConditionalRequestConflict when two conditional writes race.
                if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                    raise PreconditionFailed(f"s3://{path}") from None
                raise
            return resp["ETag"]

    def delete(self, path: str) -> None:
        bucket, key = split_key(path)
        with _named(path):
            self.client.delete_object(Bucket=bucket, Key=key)

    def delete_prefix(self, path: str) -> None:
        with _named(path):
            delete_below(self.client, path)


@contextlib.contextmanager
def _named(path: str) -> Iterator[None]:
    """Turn boto3 failures (after its retries) into one line that names the object."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        err = exc.response.get("Error", {})
        raise StorageError(f"s3://{path}: {err.get('Code', 'error')}: {err.get('Message', exc)}") from None
    except BotoCoreError as exc:
        raise StorageError(f"s3://{path}: {exc}") from None


class LocalObjects:
    def get(self, path: str) -> Optional[Stored]:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        return Stored(data, _digest(data))

    def put(self, path: str, data: bytes, *, if_absent: bool = False, if_tag: Optional[str] = None,
            content_type: Optional[str] = None) -> str:
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = _write_temp(folder, data)
        try:
            if not if_absent and if_tag is None:
                os.replace(tmp, path)
                return _digest(data)
            with _folder_lock(folder):
                if if_absent:
                    try:
                        os.link(tmp, path)  # atomic create-if-absent, like O_EXCL but never half-written
                    except FileExistsError:
                        raise PreconditionFailed(path) from None
                else:
                    current = self.get(path)
                    if current is None or current.tag != if_tag:
                        raise PreconditionFailed(path)
                    os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return _digest(data)

    def delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def delete_prefix(self, path: str) -> None:
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            self.delete(path)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_temp(folder: str, data: bytes) -> str:
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return tmp


@contextlib.contextmanager
def _folder_lock(folder: str) -> Iterator[None]:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock
