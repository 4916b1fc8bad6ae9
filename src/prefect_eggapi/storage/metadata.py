"""S3 user metadata of stored images: the store's reserved keys, the caller's keys normalised,
and values made safe for HTTP headers (ASCII only; anything else is RFC 2047 encoded).

The limits are checked before any download starts, so a bad key costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping

from prefect_eggapi.client.errors import InvalidMetadataError

#: S3 user metadata (keys + values) is limited to 2 KiB per object.
MAX_METADATA_BYTES = 2048

META_SHA256 = "sha256"
META_WIDTH = "width"
META_HEIGHT = "height"
META_FORMAT = "format"
META_TASK = "eggapi-task-id"
META_INDEX = "output-index"
RESERVED_META = frozenset(
    {META_SHA256, META_WIDTH, META_HEIGHT, META_FORMAT, META_TASK, META_INDEX}
)

_META_KEY_INVALID = re.compile(r"[^a-z0-9-]+")
_B_PREFIX = "=?UTF-8?B?"
_B_SUFFIX = "?="


def _plain_ascii(value: str) -> bool:
    return (
        value.isascii()
        and value.isprintable()
        and value == value.strip()
        and not (value.startswith(_B_PREFIX) and value.endswith(_B_SUFFIX))
    )


def encode_metadata_value(value: str) -> str:
    """Printable ASCII passes through; anything else becomes RFC 2047 ``=?UTF-8?B?...?=``."""
    if _plain_ascii(value):
        return value
    return _B_PREFIX + base64.b64encode(value.encode("utf-8")).decode("ascii") + _B_SUFFIX


def decode_metadata_value(value: str) -> str:
    """Inverse of :func:`encode_metadata_value` (values not in that form are returned as is)."""
    if value.startswith(_B_PREFIX) and value.endswith(_B_SUFFIX):
        body = value[len(_B_PREFIX) : -len(_B_SUFFIX)]
        try:
            return base64.b64decode(body, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return value
    return value


def _normalise_meta_key(key: str) -> str:
    normalised = _META_KEY_INVALID.sub("-", str(key).strip().lower()).strip("-")
    if not normalised:
        raise InvalidMetadataError(f"metadata key {key!r} has no usable characters")
    return normalised


def user_metadata(reserved: Mapping[str, str], extra: Mapping[str, str] | None) -> dict[str, str]:
    """Reserved entries plus the caller's, keys normalised; values as given (not encoded)."""
    out = dict(reserved)
    origin: dict[str, str] = {}
    for raw_key, raw_value in (extra or {}).items():
        key = _normalise_meta_key(raw_key)
        if key in RESERVED_META:
            raise InvalidMetadataError(
                f"metadata key {raw_key!r} is reserved (set by the store: "
                f"{', '.join(sorted(RESERVED_META))})"
            )
        if key in origin:
            raise InvalidMetadataError(
                f"metadata keys {origin[key]!r} and {raw_key!r} both normalise to {key!r}"
            )
        origin[key] = str(raw_key)
        out[key] = str(raw_value)
    encoded_size = sum(len(k) + len(encode_metadata_value(v)) for k, v in out.items())
    if encoded_size > MAX_METADATA_BYTES:
        raise InvalidMetadataError(
            f"metadata is {encoded_size} bytes once encoded; S3 allows {MAX_METADATA_BYTES}"
        )
    return out
