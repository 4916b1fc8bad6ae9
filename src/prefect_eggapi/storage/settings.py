"""Where the bucket is and how to reach it: :class:`S3Settings`, the boto3 client and the
transfer config built from them, and the naming rules they validate.

Kept apart from the store so that the ledger (which shares the bucket) and the flows (which turn
parameters into settings) need not know how images are written.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MiB = 1024 * 1024
#: EggAPI accepts at most this many ``image_urls`` for an edit.
MAX_EDIT_INPUTS = 9
#: Presigned input URLs must outlive EggAPI's queue plus processing time; an hour is a safe floor.
RECOMMENDED_MIN_PRESIGN_SECONDS = 3600
#: SigV4 presigned URLs cannot live longer than 7 days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
#: S3 refuses multipart parts smaller than this (except the last one).
MIN_PART_SIZE = 5 * MiB

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_SEGMENT_RE = re.compile(r"^[A-Za-z0-9!_.*'()=+,;:@ -]+$")


def validate_bucket_name(name: str, *, field: str = "bucket") -> str:
    """S3 bucket naming rules; the error names ``field``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{field}: bucket name must be a non-empty string")
    if not _BUCKET_RE.match(name):
        raise ValueError(
            f"{field}: {name!r} is not a valid S3 bucket name (3-63 characters: lowercase "
            "letters, digits, '.' and '-', starting and ending with a letter or digit)"
        )
    if ".." in name or ".-" in name or "-." in name:
        raise ValueError(f"{field}: {name!r} must not contain '..', '.-' or '-.'")
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        pass
    else:
        raise ValueError(f"{field}: {name!r} must not be formatted as an IP address")
    if name.startswith(("xn--", "sthree-")) or name.endswith(("-s3alias", "--ol-s3")):
        raise ValueError(f"{field}: {name!r} uses a prefix or suffix reserved by S3")
    return name


def validate_prefix(prefix: str, *, field: str = "prefix") -> str:
    """Normalise a key prefix (strip surrounding '/'); '' means the bucket root."""
    if not isinstance(prefix, str):
        raise ValueError(f"{field}: must be a string")
    cleaned = prefix.strip("/")
    if not cleaned:
        return ""
    if len(cleaned) > 512:
        raise ValueError(f"{field}: at most 512 characters, got {len(cleaned)}")
    for segment in cleaned.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"{field}: {prefix!r} has an empty, '.' or '..' path segment")
        if not _PREFIX_SEGMENT_RE.match(segment):
            raise ValueError(
                f"{field}: {prefix!r} may only contain ASCII letters, digits, '/' and "
                "!_.*'()=+,;:@- and spaces"
            )
    return cleaned


class S3Settings(BaseModel):
    """Where and how to store images. Credentials left unset use boto3's default chain."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bucket: str
    prefix: str = "eggapi"
    endpoint_url: str | None = None
    region_name: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None
    connect_timeout: float = Field(default=10.0, gt=0, le=300)
    read_timeout: float = Field(default=60.0, gt=0, le=3600)
    max_attempts: int = Field(default=5, ge=1, le=20)
    multipart_threshold: int = Field(default=16 * MiB, ge=MIN_PART_SIZE)
    multipart_chunksize: int = Field(default=8 * MiB, ge=MIN_PART_SIZE, le=5 * 1024 * MiB)
    max_concurrency: int = Field(default=4, ge=1, le=64)
    presign_expires_in: int = Field(
        default=RECOMMENDED_MIN_PRESIGN_SECONDS, ge=1, le=MAX_PRESIGN_SECONDS
    )
    spool_max_memory: int = Field(default=4 * MiB, ge=0)

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        return validate_bucket_name(value, field="bucket")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return validate_prefix(value, field="prefix")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"endpoint_url: {value!r} must be an http:// or https:// URL")
        return value.rstrip("/")

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        bucket: str | None = None,
        prefix: str | None = None,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | SecretStr | None = None,
        aws_session_token: str | SecretStr | None = None,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        max_attempts: int | None = None,
        multipart_threshold: int | None = None,
        multipart_chunksize: int | None = None,
        max_concurrency: int | None = None,
        presign_expires_in: int | None = None,
        spool_max_memory: int | None = None,
    ) -> S3Settings:
        """Settings from the environment.

        ``EGGAPI_S3_BUCKET`` (required unless ``bucket=`` is passed), ``EGGAPI_S3_PREFIX``,
        ``AWS_ENDPOINT_URL_S3`` or else ``AWS_ENDPOINT_URL``, ``AWS_REGION`` or else
        ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
        ``AWS_SESSION_TOKEN``. A keyword given (not None) wins; None leaves the environment's
        value, or the field's default.
        """
        env = os.environ if environ is None else environ

        def get(value: object | None, *names: str) -> object | None:
            """The keyword if given, else the first of ``names`` set in the environment."""
            if value is not None:
                return value
            return next((env[name] for name in names if env.get(name)), None)

        given: dict[str, object | None] = {
            "bucket": get(bucket, "EGGAPI_S3_BUCKET"),
            "prefix": get(prefix, "EGGAPI_S3_PREFIX"),
            "endpoint_url": get(endpoint_url, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
            "region_name": get(region_name, "AWS_REGION", "AWS_DEFAULT_REGION"),
            "aws_access_key_id": get(aws_access_key_id, "AWS_ACCESS_KEY_ID"),
            "aws_secret_access_key": get(aws_secret_access_key, "AWS_SECRET_ACCESS_KEY"),
            "aws_session_token": get(aws_session_token, "AWS_SESSION_TOKEN"),
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
            "max_attempts": max_attempts,
            "multipart_threshold": multipart_threshold,
            "multipart_chunksize": multipart_chunksize,
            "max_concurrency": max_concurrency,
            "presign_expires_in": presign_expires_in,
            "spool_max_memory": spool_max_memory,
        }
        values = {k: v for k, v in given.items() if v is not None}
        if not values.get("bucket"):
            raise ValueError("bucket: set EGGAPI_S3_BUCKET (or pass bucket=...)")
        return cls.model_validate(values)

    def transfer_config(self) -> TransferConfig:
        return make_transfer_config(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=self.max_concurrency,
        )


def make_transfer_config(
    *,
    multipart_threshold: int = 16 * MiB,
    multipart_chunksize: int = 8 * MiB,
    max_concurrency: int = 4,
) -> TransferConfig:
    """A TransferConfig whose upload memory is about ``(max_concurrency + 1) * chunksize``.

    s3transfer reads each part of a file object into memory and by default allows 10 of them;
    we allow only as many as can be in flight. The classic transfer client is pinned so that a
    failed multipart upload is aborted the same way whether or not awscrt is installed.
    """
    config = TransferConfig(
        multipart_threshold=multipart_threshold,
        multipart_chunksize=multipart_chunksize,
        max_concurrency=max_concurrency,
        preferred_transfer_client="classic",
    )
    config.max_in_memory_upload_chunks = max(1, max_concurrency)
    return config


def build_s3_client(settings: S3Settings) -> S3Client:
    """A boto3 S3 client with timeouts on every call, standard retries, SigV4, and path-style
    addressing when an endpoint URL is set (S3-compatible servers, local SeaweedFS)."""
    config = Config(
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        retries={"mode": "standard", "total_max_attempts": settings.max_attempts},
        signature_version="s3v4",
        s3={"addressing_style": "path"} if settings.endpoint_url else None,
    )
    session = boto3.session.Session(
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=(
            settings.aws_secret_access_key.get_secret_value()
            if settings.aws_secret_access_key
            else None
        ),
        aws_session_token=(
            settings.aws_session_token.get_secret_value() if settings.aws_session_token else None
        ),
        region_name=settings.region_name,
    )
    return session.client("s3", endpoint_url=settings.endpoint_url, config=config)
