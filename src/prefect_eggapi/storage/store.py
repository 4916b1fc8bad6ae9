"""Persist EggAPI outputs (and stage edit inputs) in the user's S3 bucket, with plain boto3.

Why it works this way:

- **Retention of EggAPI output URLs is unknown**, so outputs are copied to the user's bucket
  promptly after a task completes, and tasks hand around references (:class:`StoredImage`:
  S3 URI, key, checksum, metadata), never image bytes.
- **Deterministic keys** ``{prefix}/{task_id}/{index}.{ext}``: the outputs of a finished EggAPI
  task never change, so a rerun, a Prefect retry or another worker finds the object at the same
  key (:meth:`OutputStore.find_existing`) and skips even the download; :meth:`OutputStore.persist`
  skips the upload when an object with the same sha256 is already there.
- **Bounded memory**: the download is streamed chunk by chunk into a spool (see
  :mod:`.spool`) while sha256, size, format and pixel size are computed; the upload then streams
  from that file, in parts above the multipart threshold, with a bounded number of parts in
  flight.
- **Nothing half-written**: bytes are checked (magic bytes: PNG, JPEG, WebP, GIF) before anything
  is sent; S3 makes an object visible only when a PUT or a multipart upload completes, and boto3
  aborts a failed multipart upload, so a failure leaves no object behind.
- The extension and Content-Type come from the magic bytes, never from the URL: upstream may send
  JPEG bytes behind a ``.png`` URL.

The module is above the ~400-line mark because it is one class whose reads and writes share
the key layout and the parsing of a HEAD; the spool, the metadata rules, the S3 helpers and the
settings live in their own modules.

No Prefect imports here: the module is usable from plain scripts. Prefect-aws blocks are accepted
by shape (:class:`S3BucketLike`, :meth:`OutputStore.from_prefect_aws`). Share one
:class:`OutputStore` across threads freely: it holds no mutable state and boto3 clients are
thread-safe; async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict, Field
from s3transfer.manager import TransferManager

from prefect_eggapi.client.errors import (
    InvalidKeyError,
    StorageError,
    TooManyInputsError,
    UploadError,
)
from prefect_eggapi.client.registry import Registry
from prefect_eggapi.storage.metadata import (
    META_FORMAT,
    META_HEIGHT,
    META_INDEX,
    META_SHA256,
    META_TASK,
    META_WIDTH,
    decode_metadata_value,
    encode_metadata_value,
    user_metadata,
)
from prefect_eggapi.storage.s3 import call_failed, is_not_found
from prefect_eggapi.storage.settings import (
    MAX_EDIT_INPUTS,
    MAX_PRESIGN_SECONDS,
    RECOMMENDED_MIN_PRESIGN_SECONDS,
    MiB,
    S3Settings,
    build_s3_client,
    make_transfer_config,
    validate_bucket_name,
    validate_prefix,
)
from prefect_eggapi.storage.spool import Spooled, iter_file, spool

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import HeadObjectOutputTypeDef, PutObjectRequestTypeDef

logger = logging.getLogger(__name__)

_TASK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


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


def _image_metadata(spooled: Spooled) -> dict[str, str]:
    """The store's own metadata for an image: checksum, format and, when known, pixel size."""
    meta = {META_SHA256: spooled.sha256, META_FORMAT: spooled.info.format or ""}
    if spooled.info.width is not None and spooled.info.height is not None:
        meta[META_WIDTH] = str(spooled.info.width)
        meta[META_HEIGHT] = str(spooled.info.height)
    return meta


def _adds_default_checksum(s3: S3Client) -> bool:
    """Whether s3transfer would add its default checksum (CRC32) to an upload with this client
    (unless ``request_checksum_calculation`` is ``when_required``), so a single PUT stores the
    same checksum the transfer manager did."""
    return getattr(s3.meta.config, "request_checksum_calculation", None) == "when_supported"


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


class S3CredentialsLike(Protocol):
    """What the store uses of a prefect-aws ``AwsCredentials`` / ``MinIOCredentials`` block."""

    def get_s3_client(self) -> S3Client: ...


class S3BucketLike(Protocol):
    """What the store reads of a prefect-aws ``S3Bucket`` block (prefect_aws is not imported:
    any object of this shape will do)."""

    @property
    def bucket_name(self) -> str: ...

    @property
    def bucket_folder(self) -> str: ...

    @property
    def credentials(self) -> S3CredentialsLike: ...


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
        s3_bucket_block: S3BucketLike,
        *,
        prefix: str | None = None,
        transfer_config: TransferConfig | None = None,
        spool_max_memory: int = 4 * MiB,
        presign_expires_in: int = RECOMMENDED_MIN_PRESIGN_SECONDS,
    ) -> OutputStore:
        """A store on a prefect-aws ``S3Bucket`` block (by shape; prefect_aws not imported).

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

    def _head(self, key: str) -> HeadObjectOutputTypeDef | None:
        try:
            return self._s3.head_object(Bucket=self._bucket, Key=key)
        except ClientError as exc:
            if is_not_found(exc):
                return None
            raise call_failed("HEAD", self._bucket, key, exc) from exc
        except BotoCoreError as exc:
            raise call_failed("HEAD", self._bucket, key, exc) from exc

    def _stored_from_head(self, key: str, head: HeadObjectOutputTypeDef) -> StoredImage | None:
        metadata = {
            str(k).lower(): decode_metadata_value(str(v))
            for k, v in (head.get("Metadata") or {}).items()
        }
        sha = metadata.get(META_SHA256)
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
            format=metadata.get(META_FORMAT, ""),
            width=as_int(META_WIDTH),
            height=as_int(META_HEIGHT),
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
            raise call_failed("LIST", self._bucket, base, exc) from exc
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

    def _upload(self, spooled: Spooled, key: str, metadata: Mapping[str, str]) -> None:
        """One ``PutObject`` below the multipart threshold, the transfer manager above it.

        The manager hands a small body to a pool thread and waits for it: ~12 ms of flow CPU
        per image against ~5 ms for a plain ``put_object`` (issue 16). The single PUT streams
        from the same spool (bounded memory), with the same content type, metadata and default
        checksum (:func:`_checksum_defaults`); botocore's own retries rewind the seekable body.
        """
        encoded = {k: encode_metadata_value(v) for k, v in metadata.items()}
        spooled.fh.seek(0)
        try:
            if spooled.size < self._transfer.multipart_threshold:
                request: PutObjectRequestTypeDef = {
                    "Bucket": self._bucket,
                    "Key": key,
                    "Body": spooled.fh,
                    "ContentLength": spooled.size,
                    "ContentType": spooled.info.mime_type,
                    "Metadata": encoded,
                }
                if _adds_default_checksum(self._s3):
                    request["ChecksumAlgorithm"] = "CRC32"
                self._s3.put_object(**request)
            else:
                extra = {"ContentType": spooled.info.mime_type, "Metadata": encoded}
                self._transfer_manager().upload(
                    spooled.fh, self._bucket, key, extra_args=extra
                ).result()
        except StorageError:
            raise
        except Exception as exc:
            # s3transfer wraps some failures in its own types; keep the typed contract.
            raise call_failed("upload to", self._bucket, key, exc, UploadError) from exc

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
        user_metadata({}, metadata)
        spooled = spool(
            chunks, f"output {index} of task {task_id}", max_memory=self._spool_max_memory
        )
        try:
            info = spooled.info
            key = self.key_for(task_id, index, info.extension)
            reserved = {**_image_metadata(spooled), META_TASK: task_id, META_INDEX: str(index)}
            user_meta = user_metadata(reserved, metadata)

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
        spools: list[Spooled] = []
        try:
            for position, source in enumerate(sources):
                if isinstance(source, bytes | bytearray | memoryview):
                    chunks: Iterable[bytes] = [bytes(source)]
                    label = f"input {position} ({len(source)} bytes)"
                else:
                    path = Path(source)
                    chunks = iter_file(path)
                    label = f"input {position} ({path})"
                spools.append(spool(chunks, label, max_memory=self._spool_max_memory))
            urls: list[str] = []
            for spooled in spools:
                key = self._join("inputs", f"{spooled.sha256}.{spooled.info.extension}")
                head = self._head(key)
                existing = self._stored_from_head(key, head) if head is not None else None
                if existing is None or existing.sha256 != spooled.sha256:
                    self._upload(spooled, key, _image_metadata(spooled))
                urls.append(self.presign_get(key, expires_in))
            return urls
        finally:
            for spooled in spools:
                spooled.close()


_STORES: Registry[S3Settings, OutputStore] = Registry("output stores by settings", limit=16)
