"""Fixtures for a real S3 server on loopback (SeaweedFS ``weed mini``), never a mock.

- ``local_s3`` (session): one server for the whole session, stopped by PID at the end.
- ``s3_bucket`` (function): a fresh, uniquely named bucket.
- ``output_store`` (function): an :class:`~prefect_eggapi.storage.store.OutputStore` on that bucket.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from prefect_eggapi.storage import OutputStore
from prefect_eggapi.testing.local_s3 import LocalS3


@pytest.fixture(scope="session")
def local_s3() -> Iterator[LocalS3]:
    server = LocalS3()
    pid = server.pid
    try:
        yield server
    finally:
        server.stop()
        # The server must really be gone, not orphaned.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            pass
        else:  # pragma: no cover - only on a broken stop()
            raise AssertionError(f"SeaweedFS pid {pid} still running after stop()")


@pytest.fixture
def s3_bucket(local_s3: LocalS3) -> Iterator[str]:
    name = f"eggapi-test-{uuid.uuid4().hex[:16]}"
    local_s3.create_bucket(name)
    yield name
    client = local_s3.client()
    try:
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=name):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=name, Key=obj["Key"])
        client.delete_bucket(Bucket=name)
    except Exception:  # pragma: no cover - cleanup is best effort; the data dir goes anyway
        pass


@pytest.fixture
def output_store(local_s3: LocalS3, s3_bucket: str) -> OutputStore:
    return OutputStore(local_s3.client(), s3_bucket, prefix="eggapi")
