"""A real S3-compatible server for the batch tests: moto's, in a thread of the test process, on 127.0.0.1."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from harness.procs import free_port

BUCKET = "genembed"
CREDENTIALS = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """A moto S3 server holding an empty bucket `BUCKET`; yields its endpoint URL."""
    boto3 = pytest.importorskip("boto3", reason="the s3 extra: bash scripts/setup-tests.sh")
    server_module = pytest.importorskip("moto.server", reason="moto[server]: bash scripts/setup-tests.sh")
    port = free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=url, **CREDENTIALS).create_bucket(Bucket=BUCKET)
        yield url
    finally:
        server.stop()


def gateway_env(endpoint: str, prefix: str) -> dict[str, str]:
    """The GENEMBED_BATCH_S3_* variables of a gateway keeping its batches under `prefix` in the bucket."""
    return {
        "GENEMBED_BATCH_S3_BUCKET": BUCKET,
        "GENEMBED_BATCH_S3_PREFIX": prefix,
        "GENEMBED_BATCH_S3_ENDPOINT_URL": endpoint,
        "GENEMBED_BATCH_S3_REGION": CREDENTIALS["region_name"],
        "GENEMBED_BATCH_S3_ACCESS_KEY_ID": CREDENTIALS["aws_access_key_id"],
        "GENEMBED_BATCH_S3_SECRET_ACCESS_KEY": CREDENTIALS["aws_secret_access_key"],
    }
