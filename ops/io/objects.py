"""Small objects (manifest, reports, run claims) with atomic and conditional writes.

S3 uses boto3: a PUT is atomic, ``IfNoneMatch='*'`` creates only if absent and ``IfMatch=<etag>`` replaces (or
deletes) only the version that was read (compare-and-swap). Locally the same contract comes from a temporary
file plus ``os.link`` (create-if-absent) or ``os.replace``, with compare-and-swap serialised by ``flock`` on the
folder. Every read reports the object's age by the store's own clock (S3: the response's ``Date`` minus
``LastModified``; locally: a probe file's mtime minus the object's mtime), so hosts whose clocks disagree
still agree on how old an object is. Paths are filesystem paths as pyarrow spells them: ``bucket/key`` for
S3, absolute paths locally.
"""

from __future__ import annotations

import contextlib
import email.utils
import fcntl
import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Protocol

from labelnext.ops.io.s3 import S3Settings, delete_below, split_key


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI."""


class PreconditionFailed(RuntimeError):
    """A conditional write lost: the object exists (create) or changed since it was read (swap)."""


@dataclass(frozen=True)
class Stored:
    data: bytes
    tag: str  # ETag on S3, content hash locally: what a later compare-and-swap must match
    age_s: float = 0.0  # seconds since the object was last written, by the store's clock


class ObjectStore(Protocol):
    def get(self, path: str) -> Optional[Stored]: ...

    def put(self, path: str, data: bytes, *, if_absent: bool = False, if_tag: Optional[str] = None,
            content_type: Optional[str] = None) -> str: ...

    def delete(self, path: str, *, if_tag: Optional[str] = None) -> None: ...

    def delete_prefix(self, path: str) -> None: ...


class S3Objects:
    def __init__(self, settings: S3Settings):
        self.settings = settings
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self.settings.client(small_objects=True)
        return self._client

    def get(self, path: str) -> Optional[Stored]:
        bucket, key = split_key(path)
        with _named(path):
            try:
                resp = self.client.get_object(Bucket=bucket, Key=key)
            except self.client.exceptions.NoSuchKey:
                return None
            return Stored(resp["Body"].read(), resp["ETag"], _s3_age(resp))

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
                _raise_if_condition_lost(exc, path, conditional=if_tag is not None)
                raise
            return resp["ETag"]

    def delete(self, path: str, *, if_tag: Optional[str] = None) -> None:
        from botocore.exceptions import ClientError

        bucket, key = split_key(path)
        args = {"IfMatch": if_tag} if if_tag is not None else {}
        with _named(path):
            try:
                self.client.delete_object(Bucket=bucket, Key=key, **args)
            except ClientError as exc:
                _raise_if_condition_lost(exc, path, conditional=if_tag is not None)
                raise

    def delete_prefix(self, path: str) -> None:
        with _named(path):
            delete_below(self.client, path)


def _raise_if_condition_lost(exc: Any, path: str, *, conditional: bool) -> None:
    """412 PreconditionFailed; 409 ConditionalRequestConflict when two conditional writes race; and, for an
    ``If-Match`` write or delete, 404 NoSuchKey: the version we hold is gone."""
    code = exc.response.get("Error", {}).get("Code")
    if code in ("PreconditionFailed", "ConditionalRequestConflict") or (conditional and code in ("NoSuchKey", "404")):
        raise PreconditionFailed(f"s3://{path}") from None


def _s3_age(resp: dict[str, Any]) -> float:
    """Seconds between the object's LastModified and the response's Date header, both S3's clock."""
    date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    modified = resp.get("LastModified")
    if not date or modified is None:
        return 0.0
    return max(0.0, email.utils.parsedate_to_datetime(date).timestamp() - modified.timestamp())


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
                modified = os.fstat(fh.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return Stored(data, _digest(data), max(0.0, _filesystem_now(os.path.dirname(path)) - modified))

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

    def delete(self, path: str, *, if_tag: Optional[str] = None) -> None:
        if if_tag is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        with _folder_lock(os.path.dirname(path)):
            current = self.get(path)
            if current is None or current.tag != if_tag:
                raise PreconditionFailed(path)
            os.unlink(path)

    def delete_prefix(self, path: str) -> None:
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            self.delete(path)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _filesystem_now(folder: str) -> float:
    """The filesystem's clock (on NFS, the server's): the mtime of a file written now."""
    probe = _write_temp(folder, b"", sync=False)
    try:
        return os.stat(probe).st_mtime
    finally:
        os.unlink(probe)


def _write_temp(folder: str, data: bytes, sync: bool = True) -> str:
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        if sync:
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
