"""The output store: every S3 call the package makes, and the settings that reach the bucket.

No Prefect here: prefect-aws blocks are accepted by shape (duck typing), so the store works in
plain scripts too.
"""

from __future__ import annotations

from prefect_eggapi.storage.store import (
    MAX_EDIT_INPUTS,
    MAX_PRESIGN_SECONDS,
    RECOMMENDED_MIN_PRESIGN_SECONDS,
    InvalidKeyError,
    InvalidMetadataError,
    NotAnImageError,
    OutputStore,
    S3CallError,
    S3Settings,
    StorageError,
    StoredImage,
    TooManyInputsError,
    UploadError,
    build_s3_client,
    decode_metadata_value,
    encode_metadata_value,
    is_not_found,
    is_transient_s3_error,
    make_transfer_config,
    put_if,
    read_object,
    validate_bucket_name,
    validate_prefix,
)

__all__ = [
    "MAX_EDIT_INPUTS",
    "MAX_PRESIGN_SECONDS",
    "RECOMMENDED_MIN_PRESIGN_SECONDS",
    "InvalidKeyError",
    "InvalidMetadataError",
    "NotAnImageError",
    "OutputStore",
    "S3CallError",
    "S3Settings",
    "StorageError",
    "StoredImage",
    "TooManyInputsError",
    "UploadError",
    "build_s3_client",
    "decode_metadata_value",
    "encode_metadata_value",
    "is_not_found",
    "is_transient_s3_error",
    "make_transfer_config",
    "put_if",
    "read_object",
    "validate_bucket_name",
    "validate_prefix",
]
