"""Persist EggAPI outputs (and stage edit inputs) in the user's S3 bucket, with plain boto3.

Why it works this way:

- **Retention of EggAPI output URLs is unknown**, so outputs are copied to the user's bucket
  promptly after a task completes, and tasks hand around references (:class:`StoredImage`:
  S3 URI, key, checksum, metadata), never image bytes.
- **Deterministic keys** ``{prefix}/{task_id}/{index}.{ext}``: the outputs of a finished EggAPI
  task never change, so a rerun, a Prefect retry or another worker finds the object at the same
  key (:meth:`OutputStore.find_existing`) and skips even the download; :meth:`OutputStore.persist`
  skips the upload when an object with the same sha256 is already there.
- **Bounded memory**: the download is streamed chunk by chunk into a
  :class:`~tempfile.SpooledTemporaryFile` (a few MiB in RAM, the rest on disk) while sha256,
  size, format and pixel size are computed; the upload then streams from that file, in parts
  above the multipart threshold, with a bounded number of parts in flight.
- **Nothing half-written**: bytes are checked (magic bytes: PNG, JPEG, WebP, GIF) before anything
  is sent; S3 makes an object visible only when a PUT or a multipart upload completes, and boto3
  aborts a failed multipart upload, so a failure leaves no object behind.
- The extension and Content-Type come from the magic bytes, never from the URL: upstream may send
  JPEG bytes behind a ``.png`` URL.

No Prefect imports here: the module is usable from plain scripts. Prefect-aws blocks are accepted
by duck typing (:meth:`OutputStore.from_prefect_aws`). Share one :class:`OutputStore` across
threads freely: it holds no mutable state and boto3 clients are thread-safe; async callers use
``asyncio.to_thread``.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import ipaddress
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from s3transfer.manager import TransferManager

from prefect_eggapi.client.errors import (
    PERMANENT_S3_CODES,
    EggAPIError,
    ErrorClass,
    InvalidKeyError,
    InvalidMetadataError,
    NotAnImageError,
    S3CallError,
    StorageError,
    TooManyInputsError,
    UploadError,
)
from prefect_eggapi.client.imageinfo import ImageInfo, ImageSniffer
from prefect_eggapi.client.registry import Registry

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = [
    "MAX_EDIT_INPUTS",
    "RECOMMENDED_MIN_PRESIGN_SECONDS",
    "TRANSIENT_ERRNOS",
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
    "is_transient_os_error",
    "is_transient_s3_error",
    "make_transfer_config",
    "validate_bucket_name",
    "validate_prefix",
]

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
#: EggAPI accepts at most this many ``image_urls`` for an edit.
MAX_EDIT_INPUTS = 9
#: Presigned input URLs must outlive EggAPI's queue plus processing time; an hour is a safe floor.
RECOMMENDED_MIN_PRESIGN_SECONDS = 3600
#: SigV4 presigned URLs cannot live longer than 7 days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
#: S3 user metadata (keys + values) is limited to 2 KiB per object.
MAX_METADATA_BYTES = 2048
#: S3 refuses multipart parts smaller than this (except the last one).
MIN_PART_SIZE = 5 * MiB

_READ_CHUNK = 1 * MiB
_META_SHA256 = "sha256"
_META_WIDTH = "width"
_META_HEIGHT = "height"
_META_FORMAT = "format"
_META_TASK = "eggapi-task-id"
_META_INDEX = "output-index"
_RESERVED_META = frozenset(
    {_META_SHA256, _META_WIDTH, _META_HEIGHT, _META_FORMAT, _META_TASK, _META_INDEX}
)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


# The classes live in prefect_eggapi.client.errors (one tree); they are re-exported here.

# OS errors that another try of the same call can get past: the network, not the machine.
# PermissionError, ENOSPC, EROFS, EDQUOT and the like are not among them.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.EHOSTUNREACH,
        errno.EHOSTDOWN,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.ENETRESET,
        errno.EAGAIN,
        errno.EINTR,
    }
)


def is_transient_os_error(exc: OSError) -> bool:
    """Connection and timeout errors, or an errno of :data:`TRANSIENT_ERRNOS`."""
    return isinstance(exc, ConnectionError | TimeoutError) or exc.errno in TRANSIENT_ERRNOS


def is_transient_s3_error(exc: BaseException) -> bool:
    """Whether another try of the same S3 call may succeed: the server was unreachable, a
    connection dropped, or it answered 5xx / throttled; not permissions, a missing bucket or a
    full disk."""
    if isinstance(exc, EggAPIError):
        return exc.classification is ErrorClass.RETRYABLE
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return True
    if isinstance(exc, OSError):
        return is_transient_os_error(exc)
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code not in PERMANENT_S3_CODES and (status >= 500 or code in ("SlowDown", "503"))
    return False


def _call_failed(
    what: str, bucket: str, key: str, exc: BaseException, error: type[S3CallError] = S3CallError
) -> S3CallError:
    """The typed error for a failed S3 call, classified from the failure itself."""
    boto = isinstance(exc, ClientError | BotoCoreError)
    detail = str(exc) if boto else f"{type(exc).__name__}: {exc}"
    return error(
        f"{what} s3://{bucket}/{key} failed: {detail}",
        bucket=bucket,
        key=key,
        code=_error_code(exc),
        retryable=is_transient_s3_error(exc),
    )


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_SEGMENT_RE = re.compile(r"^[A-Za-z0-9!_.*'()=+,;:@ -]+$")
_TASK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_META_KEY_INVALID = re.compile(r"[^a-z0-9-]+")


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


def _check_task_id(task_id: str) -> str:
    if not isinstance(task_id, str) or not _TASK_ID_RE.match(task_id) or ".." in task_id:
        raise InvalidKeyError(
            f"task_id {task_id!r} cannot be used in an S3 key: expected 1-200 ASCII letters, "
            "digits, '.', '_' or '-', starting with a letter or digit"
        )
    return task_id


def _check_index(index: int) -> int:
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise InvalidKeyError(f"index must be a non-negative integer, got {index!r}")
    return index


def _check_expires(expires_in: int, field: str = "expires_in") -> int:
    if isinstance(expires_in, bool) or not isinstance(expires_in, int):
        raise ValueError(f"{field}: must be an integer number of seconds")
    if not 1 <= expires_in <= MAX_PRESIGN_SECONDS:
        raise ValueError(
            f"{field}: must be between 1 and {MAX_PRESIGN_SECONDS} seconds (SigV4 limit), "
            f"got {expires_in}"
        )
    return expires_in


# --------------------------------------------------------------------------------------------
# Metadata encoding (S3 user metadata travels in HTTP headers: ASCII only)
# --------------------------------------------------------------------------------------------

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


def _user_metadata(reserved: Mapping[str, str], extra: Mapping[str, str] | None) -> dict[str, str]:
    """Reserved entries plus the caller's, keys normalised; values as given (not encoded)."""
    out = dict(reserved)
    origin: dict[str, str] = {}
    for raw_key, raw_value in (extra or {}).items():
        key = _normalise_meta_key(raw_key)
        if key in _RESERVED_META:
            raise InvalidMetadataError(
                f"metadata key {raw_key!r} is reserved (set by the store: "
                f"{', '.join(sorted(_RESERVED_META))})"
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


# --------------------------------------------------------------------------------------------
# Settings and client
# --------------------------------------------------------------------------------------------


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
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> S3Settings:
        """Settings from the environment.

        ``EGGAPI_S3_BUCKET`` (required unless ``bucket=`` is passed), ``EGGAPI_S3_PREFIX``,
        ``AWS_ENDPOINT_URL_S3`` or else ``AWS_ENDPOINT_URL``, ``AWS_REGION`` or else
        ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
        ``AWS_SESSION_TOKEN``. Keyword overrides win.
        """
        env = os.environ if environ is None else environ

        def get(*names: str) -> str | None:
            for name in names:
                value = env.get(name)
                if value:
                    return value
            return None

        values: dict[str, Any] = {
            "bucket": get("EGGAPI_S3_BUCKET"),
            "prefix": get("EGGAPI_S3_PREFIX"),
            "endpoint_url": get("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
            "region_name": get("AWS_REGION", "AWS_DEFAULT_REGION"),
            "aws_access_key_id": get("AWS_ACCESS_KEY_ID"),
            "aws_secret_access_key": get("AWS_SECRET_ACCESS_KEY"),
            "aws_session_token": get("AWS_SESSION_TOKEN"),
        }
        values = {k: v for k, v in values.items() if v is not None}
        values.update(overrides)
        if not values.get("bucket"):
            raise ValueError("bucket: set EGGAPI_S3_BUCKET (or pass bucket=...)")
        return cls(**values)

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


_STORES: Registry[S3Settings, OutputStore] = Registry("output stores by settings", limit=16)


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


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


class StoredImage(BaseModel):
    """A reference to an image in S3: what tasks return instead of bytes."""

    model_config = ConfigDict(frozen=True)

    bucket: str
    key: str
    uri: str
    size: int
    sha256: str
    content_type: str
    format: str
    width: int | None = None
    height: int | None = None
    #: All user metadata of the object (the store's and the caller's), decoded.
    metadata: dict[str, str] = Field(default_factory=dict)
    #: False when an identical object already stored at ``key`` was reused.
    created: bool


class _Spooled:
    """A finished spool: bytes on disk/RAM plus what was learnt while writing them."""

    def __init__(self, fh: IO[bytes], sha256: str, size: int, info: ImageInfo) -> None:
        self.fh = fh
        self.sha256 = sha256
        self.size = size
        self.info = info

    def close(self) -> None:
        self.fh.close()


class _S3BucketLike(Protocol):
    bucket_name: str
    bucket_folder: str
    credentials: Any


def _error_code(exc: BaseException) -> str | None:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", "")) or None
    return None


def is_not_found(exc: BaseException) -> bool:
    """Whether an S3 error says the object (or key) does not exist."""
    if not isinstance(exc, ClientError):
        return False
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return _error_code(exc) in ("404", "NoSuchKey", "NotFound") or status == 404


def read_object(s3: S3Client, bucket: str, key: str) -> tuple[bytes, str] | None:
    """The object's bytes and ETag, or None when it does not exist."""
    try:
        obj = s3.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if is_not_found(exc):
            return None
        raise
    return obj["Body"].read(), obj["ETag"]


def put_if(
    s3: S3Client,
    bucket: str,
    key: str,
    body: bytes,
    version: str | None,
    *,
    content_type: str = "application/json",
) -> str | None:
    """PUT only over the ETag ``version`` (None: only where no object exists yet).

    The new ETag, or None when the condition failed (someone else wrote first): the basis of
    every compare-and-swap the package makes in S3.
    """
    condition = {"IfMatch": version} if version else {"IfNoneMatch": "*"}
    try:
        result = s3.put_object(
            Bucket=bucket,
            Key=key,
            Body=body,
            ContentType=content_type,
            **condition,  # type: ignore[arg-type]
        )
    except ClientError as exc:
        if _error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return None
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
            return None
        raise
    return result["ETag"]


def _iter_file(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(_READ_CHUNK):
            yield chunk


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


class OutputStore:
    """Persist images under ``s3://{bucket}/{prefix}/...`` with deterministic keys."""

    def __init__(
        self,
        s3_client: S3Client,
        bucket: str,
        prefix: str = "eggapi",
        *,
        transfer_config: TransferConfig | None = None,
        spool_max_memory: int = 4 * MiB,
        presign_expires_in: int = RECOMMENDED_MIN_PRESIGN_SECONDS,
    ) -> None:
        self._s3 = s3_client
        self._bucket = validate_bucket_name(bucket, field="bucket")
        self._prefix = validate_prefix(prefix, field="prefix")
        self._transfer = transfer_config or make_transfer_config()
        self._spool_max_memory = spool_max_memory
        self._presign_expires_in = _check_expires(presign_expires_in, "presign_expires_in")
        self._manager: TransferManager | None = None
        self._manager_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OutputStore(bucket={self._bucket!r}, prefix={self._prefix!r})"

    def _transfer_manager(self) -> TransferManager:
        """One transfer manager (one thread pool) for the store's lifetime.

        ``upload_fileobj`` starts a new pool per object; glibc gives each new thread its own
        malloc arena and keeps it, so peak memory grew with the number of images persisted
        (+106 MB from 2 to 8 4k images). Reusing the threads keeps it flat.
        """
        with self._manager_lock:
            if self._manager is None:
                self._manager = TransferManager(self._s3, self._transfer)
            return self._manager

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def from_settings(cls, settings: S3Settings) -> OutputStore:
        """The process's store for these settings, built once.

        A boto3 client costs ~0.3 s to build on 2 cores: per persist call that was most of the
        completion -> in S3 latency. Clients and transfer managers are thread-safe.
        """
        return _STORES.get(
            settings,
            lambda: cls(
                build_s3_client(settings),
                settings.bucket,
                settings.prefix,
                transfer_config=settings.transfer_config(),
                spool_max_memory=settings.spool_max_memory,
                presign_expires_in=settings.presign_expires_in,
            ),
        )

    @classmethod
    def from_prefect_aws(
        cls,
        s3_bucket_block: _S3BucketLike | Any,
        *,
        prefix: str | None = None,
        transfer_config: TransferConfig | None = None,
        spool_max_memory: int = 4 * MiB,
        presign_expires_in: int = RECOMMENDED_MIN_PRESIGN_SECONDS,
    ) -> OutputStore:
        """A store on a prefect-aws ``S3Bucket`` block (duck-typed; prefect_aws not imported).

        The client is ``block.credentials.get_s3_client()``, so timeouts, retries and addressing
        style come from the block's ``aws_client_parameters`` (set ``config`` there to tune
        them). The prefix is ``prefix`` if given, else ``block.bucket_folder`` when set, else
        ``"eggapi"``.
        """
        credentials = getattr(s3_bucket_block, "credentials", None)
        bucket = getattr(s3_bucket_block, "bucket_name", None)
        if credentials is None or not hasattr(credentials, "get_s3_client") or not bucket:
            raise TypeError(
                "from_prefect_aws expects a prefect-aws S3Bucket block (with bucket_name and "
                f"credentials.get_s3_client()), got {type(s3_bucket_block).__name__}"
            )
        if prefix is None:
            folder = getattr(s3_bucket_block, "bucket_folder", "") or ""
            prefix = str(folder).strip("/") or "eggapi"
        return cls(
            credentials.get_s3_client(),
            str(bucket),
            prefix,
            transfer_config=transfer_config,
            spool_max_memory=spool_max_memory,
            presign_expires_in=presign_expires_in,
        )

    # -- accessors ------------------------------------------------------------------------------

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def client(self) -> S3Client:
        return self._s3

    def _join(self, *parts: str) -> str:
        return "/".join(p for p in (self._prefix, *parts) if p)

    def key_for(self, task_id: str, index: int, extension: str) -> str:
        """``{prefix}/{task_id}/{index}.{extension}``."""
        _check_task_id(task_id)
        _check_index(index)
        return self._join(task_id, f"{index}.{extension}")

    def uri(self, key: str) -> str:
        return f"s3://{self._bucket}/{key}"

    # -- reading --------------------------------------------------------------------------------

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return dict(self._s3.head_object(Bucket=self._bucket, Key=key))
        except ClientError as exc:
            if is_not_found(exc):
                return None
            raise _call_failed("HEAD", self._bucket, key, exc) from exc
        except BotoCoreError as exc:
            raise _call_failed("HEAD", self._bucket, key, exc) from exc

    def _stored_from_head(self, key: str, head: Mapping[str, Any]) -> StoredImage | None:
        metadata = {
            str(k).lower(): decode_metadata_value(str(v))
            for k, v in (head.get("Metadata") or {}).items()
        }
        sha = metadata.get(_META_SHA256)
        if not sha or not re.fullmatch(r"[0-9a-f]{64}", sha):
            return None

        def as_int(name: str) -> int | None:
            value = metadata.get(name)
            return int(value) if value and value.isdigit() else None

        return StoredImage(
            bucket=self._bucket,
            key=key,
            uri=self.uri(key),
            size=int(head.get("ContentLength", 0)),
            sha256=sha,
            content_type=str(head.get("ContentType") or "application/octet-stream"),
            format=metadata.get(_META_FORMAT, ""),
            width=as_int(_META_WIDTH),
            height=as_int(_META_HEIGHT),
            metadata=metadata,
            created=False,
        )

    def find_existing(self, task_id: str, index: int) -> StoredImage | None:
        """The object already stored for this output, whatever its extension, or None.

        Only objects carrying a sha256 in their metadata are trusted (this store writes the
        metadata atomically with the bytes; other writers' objects are ignored). Callers use
        this to skip the download on reruns: outputs of a finished EggAPI task never change.
        """
        base = self.key_for(task_id, index, "")  # "{prefix}/{task}/{index}."
        try:
            listing = self._s3.list_objects_v2(Bucket=self._bucket, Prefix=base, MaxKeys=20)
        except (ClientError, BotoCoreError) as exc:
            raise _call_failed("LIST", self._bucket, base, exc) from exc
        for obj in sorted(listing.get("Contents", []), key=lambda o: o.get("Key", "")):
            key = obj.get("Key", "")
            suffix = key[len(base) :]
            if not suffix or "/" in suffix or "." in suffix:
                continue
            head = self._head(key)
            if head is None:
                continue
            stored = self._stored_from_head(key, head)
            if stored is not None:
                return stored
        return None

    def presign_get(self, key: str, expires_in: int | None = None) -> str:
        """A presigned GET URL for ``key`` (default lifetime: the store's presign_expires_in)."""
        seconds = _check_expires(self._presign_expires_in if expires_in is None else expires_in)
        return self._s3.generate_presigned_url(
            "get_object",
            Params={"Bucket": self._bucket, "Key": key},
            ExpiresIn=seconds,
        )

    # -- writing --------------------------------------------------------------------------------

    def _spool(self, chunks: Iterable[bytes], what: str) -> _Spooled:
        """Copy the stream into a spooled temp file, hashing and sniffing on the way.

        Exceptions from the iterator propagate unchanged (the download's own error types),
        after the spool is closed. Raises NotAnImageError for unknown magic bytes.
        """
        fh = tempfile.SpooledTemporaryFile(max_size=self._spool_max_memory)  # noqa: SIM115
        try:
            digest = hashlib.sha256()
            sniffer = ImageSniffer()
            size = 0
            head = b""
            for chunk in chunks:
                if not chunk:
                    continue
                view = bytes(chunk) if not isinstance(chunk, bytes) else chunk
                if len(head) < 16:
                    head += view[: 16 - len(head)]
                digest.update(view)
                sniffer.feed(view)
                fh.write(view)
                size += len(view)
            info = sniffer.info
            if info.format is None:
                raise NotAnImageError(
                    f"{what} is not an image (PNG, JPEG, WebP or GIF by magic bytes): "
                    f"{size} bytes starting {head[:16]!r}",
                    head=head,
                    size=size,
                )
            fh.seek(0)
            return _Spooled(fh, digest.hexdigest(), size, info)
        except BaseException:
            fh.close()
            raise

    def _upload(self, spooled: _Spooled, key: str, metadata: Mapping[str, str]) -> None:
        extra = {
            "ContentType": spooled.info.mime_type,
            "Metadata": {k: encode_metadata_value(v) for k, v in metadata.items()},
        }
        spooled.fh.seek(0)
        try:
            self._transfer_manager().upload(
                spooled.fh, self._bucket, key, extra_args=extra
            ).result()
        except StorageError:
            raise
        except Exception as exc:
            # s3transfer wraps some failures in its own types; keep the typed contract.
            raise _call_failed("upload to", self._bucket, key, exc, UploadError) from exc

    def persist(
        self,
        chunks: Iterable[bytes],
        *,
        task_id: str,
        index: int,
        metadata: Mapping[str, str] | None = None,
    ) -> StoredImage:
        """Stream one output image into ``{prefix}/{task_id}/{index}.{ext}``.

        The chunks are spooled (bounded memory) and checked before anything is sent. If an
        object with the same sha256 already sits at the key it is reused (``created=False``).
        Raises NotAnImageError (nothing written), InvalidKeyError / InvalidMetadataError before
        reading, UploadError when S3 fails (no object left), or whatever the chunk iterator
        raises (nothing written).
        """
        _check_task_id(task_id)
        _check_index(index)
        # Validate caller metadata before consuming the (possibly slow) download.
        _user_metadata({}, metadata)
        spooled = self._spool(chunks, f"output {index} of task {task_id}")
        try:
            info = spooled.info
            key = self.key_for(task_id, index, info.extension)
            reserved = {
                _META_SHA256: spooled.sha256,
                _META_FORMAT: info.format or "",
                _META_TASK: task_id,
                _META_INDEX: str(index),
            }
            if info.width is not None and info.height is not None:
                reserved[_META_WIDTH] = str(info.width)
                reserved[_META_HEIGHT] = str(info.height)
            user_meta = _user_metadata(reserved, metadata)

            head = self._head(key)
            if head is not None:
                existing = self._stored_from_head(key, head)
                if existing is not None and existing.sha256 == spooled.sha256:
                    return existing
                logger.warning(
                    "s3://%s/%s exists with a different or missing sha256; overwriting",
                    self._bucket,
                    key,
                )
            self._upload(spooled, key, user_meta)
            return StoredImage(
                bucket=self._bucket,
                key=key,
                uri=self.uri(key),
                size=spooled.size,
                sha256=spooled.sha256,
                content_type=info.mime_type,
                format=info.format or "",
                width=info.width,
                height=info.height,
                metadata=user_meta,
                created=True,
            )
        finally:
            spooled.close()

    def persist_bytes(
        self,
        data: bytes,
        *,
        task_id: str,
        index: int,
        metadata: Mapping[str, str] | None = None,
    ) -> StoredImage:
        """:meth:`persist` for bytes already in memory."""
        return self.persist([data], task_id=task_id, index=index, metadata=metadata)

    def stage_inputs(self, sources: Sequence[Path | bytes], *, expires_in: int) -> list[str]:
        """Upload local edit inputs and return presigned GET URLs EggAPI can fetch.

        Keys are content-addressed, ``{prefix}/inputs/{sha256}.{ext}``; an input already
        there is not uploaded again. At most :data:`MAX_EDIT_INPUTS` (9) sources, checked before
        any upload; every source must be an image (magic bytes), also checked before any upload.
        ``expires_in`` must cover EggAPI's queue plus processing time: at least
        :data:`RECOMMENDED_MIN_PRESIGN_SECONDS` (3600) is recommended; shorter lifetimes are
        accepted (with a warning) for tests and local emulators.
        """
        if len(sources) > MAX_EDIT_INPUTS:
            raise TooManyInputsError(
                f"EggAPI accepts at most {MAX_EDIT_INPUTS} input images per edit; "
                f"got {len(sources)}"
            )
        _check_expires(expires_in)
        if expires_in < RECOMMENDED_MIN_PRESIGN_SECONDS:
            logger.warning(
                "presigned input URLs expire in %d s; EggAPI may still be queueing by then "
                "(>= %d s recommended)",
                expires_in,
                RECOMMENDED_MIN_PRESIGN_SECONDS,
            )
        spools: list[_Spooled] = []
        try:
            for position, source in enumerate(sources):
                if isinstance(source, bytes | bytearray | memoryview):
                    chunks: Iterable[bytes] = [bytes(source)]
                    label = f"input {position} ({len(source)} bytes)"
                else:
                    path = Path(source)
                    chunks = _iter_file(path)
                    label = f"input {position} ({path})"
                spools.append(self._spool(chunks, label))
            urls: list[str] = []
            for spooled in spools:
                key = self._join("inputs", f"{spooled.sha256}.{spooled.info.extension}")
                head = self._head(key)
                existing = self._stored_from_head(key, head) if head is not None else None
                if existing is None or existing.sha256 != spooled.sha256:
                    meta = {_META_SHA256: spooled.sha256, _META_FORMAT: spooled.info.format or ""}
                    if spooled.info.width is not None and spooled.info.height is not None:
                        meta[_META_WIDTH] = str(spooled.info.width)
                        meta[_META_HEIGHT] = str(spooled.info.height)
                    self._upload(spooled, key, meta)
                urls.append(self.presign_get(key, expires_in))
            return urls
        finally:
            for spooled in spools:
                spooled.close()
