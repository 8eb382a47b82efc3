"""S3 access: endpoint/region resolution, boto3 clients, and a pyarrow filesystem that encrypts every write.

pyarrow's ``S3FileSystem`` cannot ask for server-side encryption: its ``default_metadata`` only carries ACL,
Cache-Control, Content-Type, Content-Language and Expires. When ``storage.sse`` is set, every write therefore
goes through boto3 with ``ServerSideEncryption``/``SSEKMSKeyId`` (``EncryptingS3Handler``), while reads,
listings and deletes stay on pyarrow's native client. The handler pickles to its settings only, so Ray
workers that receive the filesystem write with the same encryption; credentials are never part of it and
come from each process's AWS credential chain (environment, profile, instance or IRSA role).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any, Literal, Optional

import pyarrow as pa
from pyarrow import fs as pafs

from pydantic import Field, model_validator

from labelnext.ops.core.settings import StageSettings


# Timeouts of one small-object request (run claims, manifests, reports): they bound how long one claim renewal
# can take, which the claim timeout must outlast.
SMALL_OBJECT_CONNECT_TIMEOUT_S = 5.0
SMALL_OBJECT_READ_TIMEOUT_S = 10.0
# botocore's standard retry mode: the i-th retry sleeps up to min(2 ** (i - 1), 20) s (throttling scale), plus
# up to 5 s more when S3 sends x-amz-retry-after.
_BOTO_MAX_BACKOFF_S = 20.0
_BOTO_RETRY_AFTER_EXTRA_S = 5.0


def longest_retry_sequence_s(retries: int) -> float:
    """The longest one small-object request can take with ``retries`` retries: every attempt times out and
    every backoff is at its cap."""
    backoff = sum(min(2.0 ** (i - 1), _BOTO_MAX_BACKOFF_S) + _BOTO_RETRY_AFTER_EXTRA_S for i in range(1, retries + 1))
    return backoff + (retries + 1) * (SMALL_OBJECT_CONNECT_TIMEOUT_S + SMALL_OBJECT_READ_TIMEOUT_S)


class StorageConfig(StageSettings):
    """``storage``: the object store's endpoint, encryption, retries, run-claim timeout and filesystem sharing."""

    endpoint_url: Optional[str] = Field(default=None, description="S3 endpoint; unset: AWS_ENDPOINT_URL_S3 or "
                                        "AWS_ENDPOINT_URL, else AWS's own")
    region: Optional[str] = Field(default=None, description="S3 region; unset: AWS_REGION, AWS_DEFAULT_REGION or the "
                                  "region of AWS_PROFILE")
    sse: Literal["none", "AES256", "aws:kms"] = Field(default="none", description="server-side encryption of every "
                                                      "object labelnext writes")
    kms_key_id: Optional[str] = Field(default=None, description="KMS key ARN; required when sse is aws:kms")
    retries: int = Field(default=5, ge=0, description="retries of a transient S3 error (500/503, throttling), with "
                         "backoff, by pyarrow and boto3")
    lock_timeout_s: float = Field(default=300.0, gt=0, description="a run's claim is abandoned this long after its last renewal")
    shared_filesystem: bool = Field(
        default=False, description="local paths (corpus, output, caches) are one shared filesystem (NFS, FSx) "
                                   "that every node of a multi-node cluster sees")

    @model_validator(mode="after")
    def _kms_needs_key(self) -> "StorageConfig":
        if self.sse == "aws:kms" and not self.kms_key_id:
            raise ValueError("storage.kms_key_id is required when storage.sse is aws:kms")
        return self

    @model_validator(mode="after")
    def _claim_outlasts_retries(self) -> "StorageConfig":
        # A renewal starts lock_timeout_s / 5 after the last one and may retry for the longest sequence; the
        # claim must still be unexpired when it lands, or a live run loses its claim to a slow store.
        longest = longest_retry_sequence_s(self.retries)
        needed = 1.25 * longest
        if self.lock_timeout_s <= needed:
            raise ValueError(
                f"storage.lock_timeout_s={self.lock_timeout_s:g} must exceed {needed:.0f}s: a claim renewal with "
                f"storage.retries={self.retries} can take up to {longest:.0f}s (every attempt timing out, botocore's "
                "backoff at its cap), and it starts lock_timeout_s / 5 after the previous one; raise "
                "storage.lock_timeout_s or lower storage.retries"
            )
        return self

# Parts stay in memory up to this size, then spill to a temporary file before the upload.
_SPOOL_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class S3Settings:
    """Non-secret S3 settings resolved once on the driver and shipped to workers as they are."""

    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    sse: str = "none"
    kms_key_id: Optional[str] = None
    retries: int = 5

    @classmethod
    def from_config(cls, cfg: StorageConfig) -> "S3Settings":
        """Config overrides first, else the standard AWS environment (``AWS_ENDPOINT_URL[_S3]``, region, profile)."""
        endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region is None:
            import boto3

            region = boto3.Session().region_name  # the profile's region (AWS_PROFILE / ~/.aws/config)
        return cls(endpoint_url=endpoint or None, region=region, sse=cfg.sse, kms_key_id=cfg.kms_key_id,
                   retries=cfg.retries)

    @property
    def encrypts(self) -> bool:
        return self.sse != "none"

    def put_args(self) -> dict[str, str]:
        """Extra arguments for every boto3 write (PutObject, CreateMultipartUpload, CopyObject)."""
        if self.sse == "none":
            return {}
        args = {"ServerSideEncryption": self.sse}
        if self.sse == "aws:kms" and self.kms_key_id:
            args["SSEKMSKeyId"] = self.kms_key_id
        return args

    def client(self, *, small_objects: bool = False) -> Any:
        """A boto3 S3 client; ``small_objects`` bounds each request's timeouts (claims, manifests, reports)."""
        import boto3
        from botocore.config import Config

        timeouts = (dict(connect_timeout=SMALL_OBJECT_CONNECT_TIMEOUT_S, read_timeout=SMALL_OBJECT_READ_TIMEOUT_S)
                    if small_objects else {})
        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            config=Config(retries={"max_attempts": self.retries + 1, "mode": "standard"}, **timeouts),
        )

    def native_filesystem(self) -> pafs.S3FileSystem:
        kwargs: dict[str, Any] = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=self.retries + 1)}
        if self.endpoint_url:
            kwargs["endpoint_override"] = self.endpoint_url
            if self.endpoint_url.startswith("http://"):
                kwargs["scheme"] = "http"
        if self.region:
            kwargs["region"] = self.region
        return pafs.S3FileSystem(**kwargs)

    def filesystem(self) -> pafs.FileSystem:
        """pyarrow's S3 filesystem, or the encrypting wrapper when SSE is configured."""
        if not self.encrypts:
            return self.native_filesystem()
        return pafs.PyFileSystem(EncryptingS3Handler(self))


def split_key(path: str) -> tuple[str, str]:
    """``bucket/key/...`` (a pyarrow S3 path) -> (bucket, key)."""
    bucket, _, key = path.lstrip("/").partition("/")
    return bucket, key


def delete_below(client: Any, path: str) -> None:
    """Delete every object below ``path/`` with boto3.

    pyarrow's delete_dir/delete_file recreate the parent "folder" as an empty marker object, written
    without encryption; deleting through boto3 leaves nothing behind.
    """
    bucket, key = split_key(path)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key.rstrip("/") + "/"):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:  # a listing page holds at most 1000 keys, the DeleteObjects limit
            resp = client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise OSError(f"cannot delete s3://{bucket}/{first.get('Key')}: {first.get('Message')}")


class _EncryptedUpload:
    """A write-only file object that uploads its bytes with the SSE arguments when closed."""

    def __init__(self, client: Any, path: str, put_args: dict[str, str]):
        self._client = client
        self._bucket, self._key = split_key(path)
        self._args = put_args
        self._buffer = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)
        self._size = 0
        self.closed = False

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._size

    def write(self, data: Any) -> int:
        n = self._buffer.write(data)
        self._size += n
        return n

    def flush(self) -> None:
        return None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._buffer.seek(0)
            # upload_fileobj switches to a multipart upload for large objects and passes ExtraArgs to every part.
            self._client.upload_fileobj(self._buffer, self._bucket, self._key, ExtraArgs=dict(self._args))
        except Exception as exc:  # boto3's own retries are spent; pyarrow and Ray Data expect an IO error
            raise OSError(f"s3://{self._bucket}/{self._key}: upload failed: {exc}") from None
        finally:
            self._buffer.close()


class EncryptingS3Handler(pafs.FileSystemHandler):
    """A pyarrow filesystem over S3 whose writes and copies carry server-side encryption."""

    def __init__(self, settings: S3Settings):
        self.settings = settings
        self._native: Optional[pafs.S3FileSystem] = None
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["settings"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EncryptingS3Handler) and other.settings == self.settings

    def __hash__(self) -> int:
        return hash(self.settings)

    @property
    def native(self) -> pafs.S3FileSystem:
        if self._native is None:
            self._native = self.settings.native_filesystem()
        return self._native

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self.settings.client()
        return self._client

    def get_type_name(self) -> str:
        return "s3+sse"

    def normalize_path(self, path: str) -> str:
        return self.native.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.native.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.native.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        # S3 has no directories; pyarrow would PUT an unencrypted empty marker object here.
        return None

    def delete_dir(self, path: str) -> None:
        delete_below(self.client, path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        delete_below(self.client, path)

    def delete_root_dir_contents(self) -> None:
        raise PermissionError("refusing to delete the contents of the S3 root")

    def delete_file(self, path: str) -> None:
        bucket, key = split_key(path)
        self.client.delete_object(Bucket=bucket, Key=key)

    def copy_file(self, src: str, dest: str) -> None:
        bucket, key = split_key(src)
        dest_bucket, dest_key = split_key(dest)
        self.client.copy({"Bucket": bucket, "Key": key}, dest_bucket, dest_key, ExtraArgs=self.settings.put_args())

    def move(self, src: str, dest: str) -> None:
        self.copy_file(src, dest)
        self.delete_file(src)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.native.open_input_stream(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self.native.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any = None) -> pa.NativeFile:
        return pa.PythonFile(_EncryptedUpload(self.client, path, self.settings.put_args()), mode="w")

    def open_append_stream(self, path: str, metadata: Any = None) -> pa.NativeFile:
        raise NotImplementedError("S3 objects cannot be appended to")
