"""The output store: every S3 call the package makes, and the settings that reach the bucket.

``settings`` (where the bucket is, the client), ``s3`` (the shared helpers: not-found, transient,
conditional read and write), ``metadata`` (header-safe user metadata), ``spool`` (bounded-memory
streaming), ``store`` (:class:`OutputStore`). Other packages import from here only.

No Prefect here: prefect-aws blocks are accepted by shape (:class:`S3BucketLike`), so the store
works in plain scripts too. The errors live in :mod:`prefect_eggapi.client.errors` (one tree) and
are re-exported here.
"""

from __future__ import annotations

from prefect_eggapi.client.errors import (
    InvalidKeyError,
    InvalidMetadataError,
    NotAnImageError,
    S3CallError,
    StorageError,
    TooManyInputsError,
    UploadError,
)
from prefect_eggapi.storage.metadata import decode_metadata_value, encode_metadata_value
from prefect_eggapi.storage.objects import (
    bucket_problem,
    delete_keys,
    list_keys,
    put,
    stream_object,
)
from prefect_eggapi.storage.s3 import is_not_found, is_transient_s3_error, put_if, read_object
from prefect_eggapi.storage.settings import (
    MAX_EDIT_INPUTS,
    MAX_PRESIGN_SECONDS,
    RECOMMENDED_MIN_PRESIGN_SECONDS,
    S3Settings,
    build_s3_client,
    make_transfer_config,
    validate_bucket_name,
    validate_prefix,
)
from prefect_eggapi.storage.store import OutputStore, S3BucketLike, StoredImage

__all__ = [
    "MAX_EDIT_INPUTS",
    "MAX_PRESIGN_SECONDS",
    "RECOMMENDED_MIN_PRESIGN_SECONDS",
    "InvalidKeyError",
    "InvalidMetadataError",
    "NotAnImageError",
    "OutputStore",
    "S3BucketLike",
    "S3CallError",
    "S3Settings",
    "StorageError",
    "StoredImage",
    "TooManyInputsError",
    "UploadError",
    "bucket_problem",
    "build_s3_client",
    "decode_metadata_value",
    "delete_keys",
    "encode_metadata_value",
    "is_not_found",
    "is_transient_s3_error",
    "list_keys",
    "make_transfer_config",
    "put",
    "put_if",
    "read_object",
    "stream_object",
    "validate_bucket_name",
    "validate_prefix",
]
