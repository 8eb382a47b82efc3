"""A real S3 endpoint over HTTP on 127.0.0.1 (moto's server), for boto3 and pyarrow alike.

Import the fixtures in a test module (``from tests.s3_fixtures import s3_endpoint, s3_bucket``).
"""

from __future__ import annotations

import socket
import uuid
from typing import Iterator

import pytest

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Start moto's threaded server once per session; yields its http://127.0.0.1:PORT URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch) -> str:
    """Point the standard AWS settings at the local endpoint for this test (and its subprocesses)."""
    for key, value in FAKE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_endpoint


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """A fresh, empty bucket for this test; returns its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store_root(request, tmp_path):
    """A small-object store and a root inside it: the local filesystem, then the S3 endpoint."""
    from labelnext.ops.io.objects import LocalObjects, S3Objects
    from labelnext.ops.io.s3 import S3Settings, StorageConfig

    if request.param == "local":
        return LocalObjects(), str(tmp_path)
    bucket = request.getfixturevalue("s3_bucket")
    return S3Objects(S3Settings.from_config(StorageConfig())), f"{bucket}/objects"


class S3Bucket:
    """A bucket on the local endpoint, and the environment that points the CLI's standard AWS settings at it."""

    def __init__(self, endpoint: str, bucket: str):
        import boto3

        self.bucket = bucket
        self.env = {**FAKE_ENV, "AWS_ENDPOINT_URL": endpoint}
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name=FAKE_ENV["AWS_REGION"],
                                   aws_access_key_id=FAKE_ENV["AWS_ACCESS_KEY_ID"],
                                   aws_secret_access_key=FAKE_ENV["AWS_SECRET_ACCESS_KEY"])
        self.client.create_bucket(Bucket=bucket)

    def cli(self, *args: str):
        from tests.cli_run import labelnext

        return labelnext(*args, env=self.env, timeout=1200)

    def run(self, *args: str):
        return self.cli("run", *args)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put(self, key: str, table) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.client.put_object(Bucket=self.bucket, Key=key, Body=sink.getvalue().to_pybytes())

    def body(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def json(self, key: str) -> dict:
        import json

        return json.loads(self.body(key))

    def table(self, prefix: str):
        """Every Parquet object under ``prefix`` (one key: that object), concatenated in key order."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        keys = sorted(o["Key"] for page in pages for o in page.get("Contents", []))
        return pa.concat_tables([pq.read_table(pa.BufferReader(self.body(k))) for k in keys])
