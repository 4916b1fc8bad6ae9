"""Bucket and key operations on a store's bucket: reachability, plain puts, listing, deletes.

The object-level helpers with conditions (``read_object``, ``put_if``, ``is_not_found``) are in
:mod:`.s3`; these are the unconditional rest of the flows' S3 surface (status objects, shard
status, manifests), kept here so that every S3 call of the package goes through ``storage/``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prefect_eggapi.storage.store import OutputStore

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

__all__ = ["bucket_problem", "delete_keys", "list_keys", "put", "stream_object"]


def bucket_problem(store: OutputStore) -> str | None:
    """Why the store's bucket cannot be reached (None: it can), checked before any paid call.

    Any failure counts (no such bucket, refused credentials, no route to the endpoint): the
    caller reports it as a problem of its ``bucket`` parameter."""
    try:
        store.client.head_bucket(Bucket=store.bucket)
    except Exception as exc:
        return f"s3://{store.bucket} is not reachable: {exc}"
    return None


def put(
    store: OutputStore, key: str, body: bytes, *, content_type: str = "application/json"
) -> None:
    """Write ``key`` whatever is there (the conditional write is :func:`~.storage.put_if`)."""
    store.client.put_object(Bucket=store.bucket, Key=key, Body=body, ContentType=content_type)


def delete_keys(store: OutputStore, keys: Iterable[str]) -> None:
    """Delete ``keys`` in one request (missing keys are fine; at most 1000 keys)."""
    objects: list[ObjectIdentifierTypeDef] = [{"Key": key} for key in keys]
    if objects:
        store.client.delete_objects(
            Bucket=store.bucket,
            Delete={"Objects": objects, "Quiet": True},
        )


def list_keys(store: OutputStore, prefix: str) -> Iterator[str]:
    """Every key under ``prefix``, page by page."""
    pages = store.client.get_paginator("list_objects_v2").paginate(
        Bucket=store.bucket, Prefix=prefix
    )
    for page in pages:
        for obj in page.get("Contents", []):
            yield obj["Key"]


def stream_object(s3: S3Client, bucket: str, key: str, chunk_bytes: int) -> Iterator[bytes]:
    """The object's bytes in chunks of at most ``chunk_bytes`` (bounded memory, any size)."""
    body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    try:
        while chunk := body.read(chunk_bytes):
            yield chunk
    finally:
        body.close()
